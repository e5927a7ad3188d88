"""Inference latency while the kernel trains: classify p50/p99 idle vs with a training job.

One kernel with every driver and automatic placement. First a short fine-tune makes a
review classifier (``reviews-clf``), which is loaded everywhere. Then rounds alternate two
phases, measured the same way: C closed-loop clients each classify one real review
snippet at a time (from the bundled Rotten Tomatoes test split) until N requests are
answered; in the "training" phase a fine-tuning job of the same model family runs at the
same time (default priority nice 10, quanta of ``--quantum`` seconds, threads - 1 cores).
The ratio of the p99s is the cost of training next to serving.

Run: ``.venv/bin/python bench/cosched.py [--clients 4] [--requests 200] [--rounds 2]
[--quantum 1.0] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from llmos import Client
from llmos.kernel import datasets
from llmos.kernel.testing import KernelProcess, running_kernel

TARGET = 2.0


def measure(kernel: KernelProcess, texts: list[str], clients: int, requests: int) -> list[float]:
    """Latencies (ms) of ``requests`` single-text classify calls from closed-loop clients."""
    latencies: list[float] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client_loop(index: int) -> None:
        with Client(kernel.address, name=f"bench-{index}") as client:
            for i in counter:
                started = time.perf_counter()
                client.classify("reviews-clf", [texts[i % len(texts)]])
                with lock:
                    latencies.append((time.perf_counter() - started) * 1000)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quantum", type=float, default=1.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    texts = datasets.load("reviews").split("test")[0]
    results: dict[str, list[float]] = {"idle": [], "training": []}
    home = Path(tempfile.mkdtemp(prefix="llmos-cosched-"))
    with running_kernel(home) as kernel, kernel.client(timeout=3600) as client:
        client.import_model("minilm")
        trained = client.train("minilm", data="reviews", name="reviews-clf", epochs=1, limit=1000,
                               max_tokens=64)
        print(f"classifier: {trained['model']} test accuracy "
              f"{trained['metrics']['test']['accuracy']:.3f} (1000 rows, 1 epoch)")
        loaded = client.load("reviews-clf")
        print(f"loaded on {', '.join(loaded['devices'])}")
        measure(kernel, texts, args.clients, 20)  # warm-up
        for round_ in range(args.rounds):
            for phase in ("idle", "training") if round_ % 2 == 0 else ("training", "idle"):
                job = None
                if phase == "training":
                    job = client.submit("train", {"model": "minilm", "data": "reviews",
                                                  "name": "background", "epochs": 5,
                                                  "max_tokens": 64, "quantum": args.quantum},
                                        events=True)
                    job_id = job.job_id()
                    while not client.job(job_id)["progress"]:
                        time.sleep(0.1)
                latencies = measure(kernel, texts, args.clients, args.requests)
                results[phase] += latencies
                if job is not None:
                    steps = client.job(job_id)["progress"]["step"]
                    client.cancel(job_id)
                    print(f"round {round_ + 1} {phase}: p99 {percentile(latencies, 99):.1f} ms "
                          f"(training advanced to step {steps} meanwhile)")
                else:
                    print(f"round {round_ + 1} {phase}: p99 {percentile(latencies, 99):.1f} ms")
        devices = [j["device"] for j in client.jobs() if j["syscall"] == "infer"][-200:]
    summary: dict[str, Any] = {
        phase: {"p50": percentile(v, 50), "p99": percentile(v, 99), "mean": statistics.fmean(v),
                "n": len(v)} for phase, v in results.items()}
    ratio = summary["training"]["p99"] / summary["idle"]["p99"]
    print(f"\nclassify latency, {args.clients} closed-loop clients, {args.rounds} rounds x "
          f"{args.requests} requests per phase\n")
    print(f"{'phase':<10}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for phase, row in summary.items():
        print(f"{phase:<10}{row['p50']:>10.1f}{row['p99']:>10.1f}{row['mean']:>10.1f}")
    print(f"\ninfer served on: {sorted(set(devices))}")
    verdict = "met" if ratio <= TARGET else "NOT met"
    print(f"p99 with training / p99 idle = {ratio:.2f}x (target <= {TARGET}x: {verdict})")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "ratio": ratio, **vars(args)},
                                        default=str, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
