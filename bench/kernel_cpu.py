"""Where the CPU goes when the kernel serves many small requests: kernel, host, clients.

Starts a kernel with one device (default ``openvino:cpu``; ``--device ""``: every driver, as
``bench/serving.py`` (c) does), loads the bundled MiniLM, and
has ``--clients`` closed-loop clients (threads of this process, one ``Client`` each) embed
one review each per request. Over ``--requests`` requests it reads the CPU time (user +
system) of the kernel process (and of each of its threads), of each driver host, and of
this process, and prints each per request, and all but the busiest host's as a share of
that host's: the serving host's time is the inference itself (the baseline), everything
else is what serving through the kernel costs on top. It also groups the finished jobs
into batches (by start time) to show the batch sizes the clients settle into and how
long the host waits between two.

``--kernel-tree DIR`` runs the kernel (and its driver hosts) from another source tree, for
old against new with the same clients: ``git worktree add --detach /tmp/base 3362c88``,
then ``--kernel-tree /tmp/base``. The kernel then imports ``llmos`` from a tree of links
shaped like the installed package (``llmos/{contract,kernel,drivers,plugins,shell}`` ->
DIR's folders, as ``make lint`` builds for import-linter), put first on its PYTHONPATH;
it starts in the temporary home so that no checkout's own ``llmos`` folder shadows it.
Without ``--max-batch-size``/``--max-queue-delay-ms`` the kernel batches adaptively (its
default); either one fixes both knobs.

Run: ``.venv/bin/python bench/kernel_cpu.py [--precision int8] [--requests 2560]
[--clients 32] [--device openvino:cpu] [--streams 1] [--max-batch-size N]
[--max-queue-delay-ms MS] [--kernel-tree DIR] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from llmos import Client
from llmos.kernel.testing import running_kernel

sys.path.insert(0, str(Path(__file__).parent))
from serving import CALIBRATION, reviews  # noqa: E402  (a sibling script)

#: Jobs starting within this many seconds of each other were dispatched as one batch.
SAME_BATCH = 0.0005


def import_tree(source: Path, links: Path) -> Path:
    """A folder to put on PYTHONPATH so that ``llmos`` imports from the checkout ``source``."""
    package = links / "llmos"
    package.mkdir(parents=True)
    (package / "__init__.py").write_bytes((source / "llmos" / "__init__.py").read_bytes())
    (package / "contract").symlink_to(source / "llmos" / "contract")
    for name in ("kernel", "drivers", "plugins", "shell"):
        (package / name).symlink_to(source / name)
    return links


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def thread_seconds(process: psutil.Process) -> dict[int, float]:
    return {t.id: t.user_time + t.system_time for t in process.threads()}


def closed_loop(clients: list[Client], texts: list[str], requests: int) -> float:
    """Seconds for ``requests`` embed calls from every client in turn (closed loop)."""
    counter = itertools.count()

    def run(client: Client) -> None:
        while (i := next(counter)) < requests:
            client.embed("minilm", [texts[i % len(texts)]])

    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def batches(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch sizes and the host's wait between batches, from the jobs' own times."""
    jobs = sorted((j for j in jobs if j["syscall"] == "infer" and j["started_at"]),
                  key=lambda j: j["started_at"])
    groups: list[list[dict[str, Any]]] = []
    for job in jobs:
        if groups and job["started_at"] - groups[-1][-1]["started_at"] < SAME_BATCH:
            groups[-1].append(job)
        else:
            groups.append([job])
    gaps = [later[0]["started_at"] - max(j["finished_at"] for j in earlier)
            for earlier, later in itertools.pairwise(groups)]
    return {"batches": len(groups), "mean_size": statistics.mean(len(g) for g in groups),
            "last_sizes": [len(g) for g in groups[-12:]],
            "gap_ms_median": 1000 * statistics.median(gaps) if gaps else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="openvino:cpu",
                        help="the kernel's --devices (empty: every driver, placement decides)")
    parser.add_argument("--precision", choices=("f32", "bf16", "int8"), default="f32")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2560)
    parser.add_argument("--warmup", type=int, default=256)
    parser.add_argument("--chars", type=int, default=300)
    parser.add_argument("--streams", type=int, default=1, help="the kernel's --streams")
    parser.add_argument("--max-batch-size", type=int, help="fixed knobs (default: adaptive)")
    parser.add_argument("--max-queue-delay-ms", type=float, help="fixed knobs (default: adaptive)")
    parser.add_argument("--kernel-tree", type=Path, help="run the kernel from this checkout")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    pool = reviews(args.chars)
    rng = random.Random(0)
    texts = [rng.choice(pool) for _ in range(640)]
    home = Path(tempfile.mkdtemp(prefix="llmos-bcpu-"))
    knobs = ["--streams", str(args.streams)]
    for option, value in (("--max-batch-size", args.max_batch_size),
                          ("--max-queue-delay-ms", args.max_queue_delay_ms)):
        knobs += [option, str(value)] if value is not None else []
    if args.kernel_tree is not None:
        links = import_tree(args.kernel_tree.resolve(), home / "tree")
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(links), os.environ.get("PYTHONPATH")) if p)
        os.chdir(home)
    with running_kernel(home, "--devices", args.device, "--threads", "2", *knobs) as kernel:
        with kernel.client("bench-admin", timeout=900.0) as admin:
            admin.import_model("minilm")
            admin.load("minilm", precision=args.precision,
                       calibrate=CALIBRATION if args.precision == "int8" else None)
        clients = [kernel.client(f"bench-{i}") for i in range(args.clients)]
        kernel_process = psutil.Process(kernel.process.pid)
        hosts = {p.cmdline()[p.cmdline().index("--identity") + 1]: p
                 for p in kernel_process.children() if "llmos.drivers.host" in " ".join(p.cmdline())}
        closed_loop(clients, texts, args.warmup)
        processes = {"kernel": kernel_process, **hosts, "clients": psutil.Process()}
        before = {name: cpu_seconds(p) for name, p in processes.items()}
        threads_before = thread_seconds(kernel_process)
        seconds = closed_loop(clients, texts, args.requests)
        after = {name: cpu_seconds(p) for name, p in processes.items()}
        threads_after = thread_seconds(kernel_process)
        with kernel.client("bench-admin") as admin:
            batching = batches(admin.jobs())
        for client in clients:
            client.close()
    per_request = {name: 1000 * (after[name] - before[name]) / args.requests for name in processes}
    busiest = max(hosts, key=lambda name: per_request[name])
    threads = sorted((1000 * (spent - threads_before.get(tid, 0.0)) / args.requests
                      for tid, spent in threads_after.items()), reverse=True)
    report = {"settings": {k: str(v) for k, v in vars(args).items()},
              "requests_per_s": args.requests / seconds, "cpu_ms_per_request": per_request,
              "kernel_threads_ms_per_request": [round(t, 4) for t in threads if t > 0.001],
              "serving_host": busiest, "overhead_vs_inference":
              (sum(per_request.values()) - per_request[busiest]) / per_request[busiest], **batching}
    print(f"kernel from {args.kernel_tree or 'this checkout'}; "
          f"{args.clients} clients, {args.requests} requests, {args.device} {args.precision}: "
          f"{report['requests_per_s']:.1f} req/s")
    for name, value in per_request.items():
        print(f"  {name:8s} {value:7.3f} ms CPU per request")
    print(f"  kernel threads (ms per request, busiest first): {report['kernel_threads_ms_per_request']}")
    print(f"  everything else / the serving host ({busiest}) = {report['overhead_vs_inference']:.3f}")
    print(f"  batches {batching['batches']}, mean size {batching['mean_size']:.1f}, "
          f"last sizes {batching['last_sizes']}, host waits {batching['gap_ms_median']:.2f} ms "
          f"(median) between batches (negative: they overlap, on streams)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
