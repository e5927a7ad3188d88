"""Parallelism through the kernel: replicas 1 vs 2 (throughput), DDP 2 ranks vs one process
(step time, and accuracy with the same global batch and seed), and keyed dropout's cost.

One kernel with a PyTorch host (all threads) for parts 1 to 3; contenders interleaved round
by round so that drift on a shared machine hits both alike:

1. **replicas**: MiniLM loaded twice under two names, on the PyTorch host (1 replica, all
   threads) and with ``--replicas 2`` (2 hosts, ``threads // 2`` each); ``--clients``
   closed-loop clients embed ``--inputs`` review snippets a request; texts per second;
2. **DDP step time**: ``train`` on ``--step-rows`` review rows (written to a CSV, so that
   evaluation stays short): one process as llmos trains (``threads - 1`` = 1 thread, one
   core left for inference), one process with 2 threads (a second kernel started with
   ``--threads 3``), and ``--parallel ddp --world-size 2`` (2 ranks of 1 thread); the time
   per optimizer step from the jobs' own progress (examples/s over the quanta);
3. **DDP accuracy**: the bundled reviews, ``--limit`` rows, 1 epoch, batch 32, same seed,
   one process vs 2 ranks; test accuracy on the full test split;
4. **dropout** (in this process, no kernel): seconds of one MiniLM forward and backward
   (batch 32, 64 tokens, 1 thread, as llmos trains) with the model's own dropout (SDPA)
   and with the keyed dropout that training uses (llmos.drivers.dropout), interleaved.

Run: ``.venv/bin/python bench/parallel.py [--rounds 3] [--limit 2000] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from llmos.kernel import datasets
from llmos.kernel.client import Client
from llmos.kernel.sources import _minilm_path
from llmos.kernel.testing import KernelProcess, running_kernel


def throughput(kernel: KernelProcess, model: str, texts: list[str], clients: int,
               requests: int) -> float:
    """Texts per second with ``clients`` closed-loop clients, ``requests`` each."""
    def work(client: Client, offset: int) -> None:
        for i in range(requests):
            start = (offset + i * len(texts) // 7) % len(texts)
            client.embed(model, (texts * 2)[start:start + ARGS.inputs])

    pool = [kernel.client(f"bench{i}") for i in range(clients)]
    threads = [threading.Thread(target=work, args=(c, i * 13)) for i, c in enumerate(pool)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    for client in pool:
        client.close()
    return clients * requests * ARGS.inputs / seconds


def train(client: Client, **options: Any) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    started = time.perf_counter()
    pending = client.submit("train", {"model": "minilm", "name": "bench", "epochs": 1,
                                      "batch_size": 32, "max_tokens": 64, "quantum": 2.0,
                                      **options}, events=True)
    result = pending.result()
    return result, [e.body for e in pending.events if e.event == "progress"], \
        time.perf_counter() - started


def step_seconds(progress: list[dict[str, Any]], batch: int = 32) -> float:
    """Mean seconds per optimizer step over the quanta (each reports examples/s)."""
    rates = [p["examples_per_s"] for p in progress if p["examples_per_s"] > 0]
    return statistics.mean(batch / r for r in rates)


def main() -> int:
    home = Path(tempfile.mkdtemp(prefix="llmos-par-"))
    reviews = datasets.load("reviews")
    texts, labels = reviews.split("train", 0)
    step_csv = home / "step.csv"
    with open(step_csv, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows((t, reviews.labels[y]) for t, y in zip(texts[:ARGS.step_rows],
                                                               labels[:ARGS.step_rows], strict=True))
    contenders: list[tuple[str, dict[str, Any]]] = [
        ("1 process, 1 thread", {}), ("1 process, 2 threads", {}),
        ("ddp 2 ranks", {"parallel": "ddp", "world_size": 2})]
    results: dict[str, Any] = {"replicas": {"1": [], "2": []},
                               "step_s": {name: [] for name, _ in contenders}}
    if "dropout" in ARGS.parts:
        results["dropout_s"] = dropout_cost(texts, labels)
    if {"replicas", "step", "accuracy"} & set(ARGS.parts):
        through_kernel(home, texts, step_csv, contenders, results)
    shutil.rmtree(home, ignore_errors=True)
    report(results)
    if ARGS.json:
        ARGS.json.write_text(json.dumps(results, indent=2))
    return 0


def through_kernel(home: Path, texts: list[str], step_csv: Path,
                   contenders: list[tuple[str, dict[str, Any]]], results: dict[str, Any]) -> None:
    """Parts 1 to 3: a kernel with one PyTorch host, and one started with 3 threads."""
    with running_kernel(home, "--devices", "torch:cpu") as kernel, \
            kernel.client(timeout=24 * 3600) as client, \
            running_kernel(home / "threads3", "--devices", "torch:cpu", "--threads", "3") as wide, \
            wide.client(timeout=24 * 3600) as wide_client:
        client.import_model("minilm")
        wide_client.import_model("minilm")
        if "replicas" in ARGS.parts:
            replicas(kernel, client, texts, results)
        if "step" in ARGS.parts:
            step_times(client, wide_client, step_csv, contenders, results)
        if "accuracy" in ARGS.parts:
            results["accuracy"] = accuracy(client, contenders)


def replicas(kernel: KernelProcess, client: Client, texts: list[str],
             results: dict[str, Any]) -> None:
    """Part 1: one host vs two replicas, interleaved rounds."""
    client.import_model("minilm", name="minilm2")
    client.load("minilm", device="torch:cpu")
    client.load("minilm2", replicas=2)
    client.embed("minilm", texts[:8])
    client.embed("minilm2", texts[:8])
    for r in range(ARGS.rounds):
        for name, model in (("1", "minilm"), ("2", "minilm2")):
            rate = throughput(kernel, model, texts[:400], ARGS.clients, ARGS.requests)
            results["replicas"][name].append(rate)
            print(f"round {r + 1} replicas {name}: {rate:.1f} texts/s", flush=True)
    client.unload("minilm2")


def step_times(client: Client, wide_client: Client, step_csv: Path,
               contenders: list[tuple[str, dict[str, Any]]], results: dict[str, Any]) -> None:
    """Part 2: seconds per step of each contender, interleaved rounds."""
    for r in range(ARGS.rounds):
        for name, extra in contenders:
            on = wide_client if name == "1 process, 2 threads" else client
            _, progress, _ = train(on, path=str(step_csv), **extra)
            results["step_s"][name].append(step_seconds(progress))
            print(f"round {r + 1} {name}: {results['step_s'][name][-1]:.3f} s/step", flush=True)


def accuracy(client: Client, contenders: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Part 3: test accuracy of one process and of 2 DDP ranks, for each seed."""
    rows = {}
    for seed in ARGS.seeds:
        for name, extra in (contenders[0], contenders[2]):
            result, progress, seconds = train(client, data="reviews", limit=ARGS.limit,
                                              learning_rate=1e-4, seed=seed, **extra)
            label = f"{name}, seed {seed}"
            rows[label] = {"test_accuracy": result["metrics"]["test"]["accuracy"],
                           "steps": result["steps"], "minutes": round(seconds / 60, 1),
                           "sync_checks": progress[-1].get("sync_checks")}
            print(f"{label}: {rows[label]}", flush=True)
    return rows


def dropout_cost(texts: list[str], labels: list[int], steps: int = 10) -> dict[str, list[float]]:
    """Part 4: seconds of a forward and backward with plain and with keyed dropout."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llmos.drivers.dropout import DropoutKey, keyed_dropout

    torch.set_num_threads(1)
    model = AutoModelForSequenceClassification.from_pretrained(
        _minilm_path(), num_labels=2, use_safetensors=True, local_files_only=True).train()
    tokenizer = AutoTokenizer.from_pretrained(_minilm_path(), local_files_only=True)
    seconds: dict[str, list[float]] = {"plain": [], "keyed": []}
    for step in range(steps + 1):  # step 0 warms up
        rows = slice(step * 32, (step + 1) * 32)
        batch = dict(tokenizer(texts[rows], padding="longest", truncation=True, max_length=64,
                               return_tensors="pt"))
        batch["labels"] = torch.tensor(labels[rows])
        for name in ("plain", "keyed") if step % 2 else ("keyed", "plain"):
            started = time.perf_counter()
            if name == "keyed":
                with keyed_dropout(model, DropoutKey(seed=0, step=step, rows=range(32))):
                    loss = model(**batch).loss
            else:
                loss = model(**batch).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            if step:
                seconds[name].append(time.perf_counter() - started)
    return seconds


def report(results: dict[str, Any]) -> None:
    if results["replicas"]["1"]:
        report_replicas(results)
    if results["step_s"]["ddp 2 ranks"]:
        report_steps(results)
    if "dropout_s" in results:
        print("\nforward + backward, MiniLM, batch 32, 64 tokens, 1 thread (median of "
              f"{len(results['dropout_s']['plain'])} interleaved steps)")
        for name, values in results["dropout_s"].items():
            print(f"{name + ' dropout':<16}{statistics.median(values):>8.3f} s")
    if "accuracy" in results:
        print(f"\naccuracy (reviews, {ARGS.limit} rows, 1 epoch, batch 32)")
        for name, row in results["accuracy"].items():
            print(f"{name:<32}{row['test_accuracy']:>8.3f}  steps {row['steps']}  "
                  f"{row['minutes']} min  sync checks {row['sync_checks']}")


def report_replicas(results: dict[str, Any]) -> None:
    rep = {k: statistics.median(v) for k, v in results["replicas"].items()}
    print(f"\nreplicas ({ARGS.clients} clients x {ARGS.inputs} texts a request, median of "
          f"{ARGS.rounds} interleaved rounds)")
    print(f"{'replicas':<12}{'texts/s':>10}")
    for name, rate in rep.items():
        print(f"{name:<12}{rate:>10.1f}")
    print(f"ratio 2 / 1: {rep['2'] / rep['1']:.2f}x")


def report_steps(results: dict[str, Any]) -> None:
    step = {k: statistics.median(v) for k, v in results["step_s"].items()}
    print(f"\nDDP step time (batch 32, median of {ARGS.rounds} interleaved rounds)")
    print(f"{'run':<24}{'s/step':>8}{'ddp / this':>12}")
    for name, seconds in step.items():
        print(f"{name:<24}{seconds:>8.3f}{step['ddp 2 ranks'] / seconds:>11.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=25)
    parser.add_argument("--inputs", type=int, default=8)
    parser.add_argument("--step-rows", type=int, default=400)
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0],
                        help="seeds of the accuracy part, e.g. 0,1")
    parser.add_argument("--parts", type=lambda v: v.split(","),
                        default=["replicas", "step", "accuracy", "dropout"],
                        help="which parts to run: replicas,step,accuracy,dropout")
    parser.add_argument("--json", type=Path)
    ARGS = parser.parse_args()
    raise SystemExit(main())
