"""Syscall overhead: round-trip latency of the kernel's ``ping`` against a raw ZeroMQ echo.

Both contenders get the same frames, ``llmos.contract.protocol.encode_request("ping", {})``,
over the same transport (tcp loopback by default, or ipc), one request in flight at a time:

* raw echo: a spawned process with a bare pyzmq ROUTER that msgpack-unpacks the header and
  body frames and replies with them msgpack-packed -- the least work any msgpack-over-ZeroMQ
  server must do, i.e. the floor;
* kernel ping: a real ``python -m llmos.kernel`` subprocess, whose IO thread answers ``ping``
  itself (decode, validation, syscall lookup, reply encoding).

Why the baseline is fair: both servers are separate processes with their own ZeroMQ context
and ROUTERs with the kernel's socket options; the client side is identical (a DEALER with
``llmos.Client``'s options, frames built before and ``decode_reply`` run after the timed
send -> receive, measured with ``time.perf_counter_ns``). The difference is thus the kernel's
own per-syscall work and threading. R rounds of N pings each, alternating which contender
goes first, after a warm-up, so drift on the machine hits both alike; the kernel is measured
only once its device hosts have finished starting. Numbers on a small shared box are noisy.

Run: ``.venv/bin/python bench/syscall_overhead.py [--rounds 5] [--count 2000]
[--transport tcp|ipc] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing as mp
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import zmq

from llmos.contract.protocol import MAGIC, decode_reply, encode_request
from llmos.kernel.client import Client

TARGET = 1.3
SETTLED = {"READY", "FAILED", "STOPPED"}


def echo_server(address: str, ready: Any) -> None:
    """The raw echo: unpack header and body, pack them back (run in a spawned process)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    for option, value in ((zmq.ROUTER_MANDATORY, 1), (zmq.SNDHWM, 100_000), (zmq.RCVHWM, 100_000),
                          (zmq.MAXMSGSIZE, 64 * 1024 * 1024)):  # as the kernel's frontend
        sock.setsockopt(option, value)
    sock.bind(address)
    ready.set()
    while True:
        identity, _magic, header, body, *_ = sock.recv_multipart(copy=True)
        head = msgpack.unpackb(header, raw=False)
        data = msgpack.unpackb(body, raw=False)
        sock.send_multipart([identity, MAGIC, msgpack.packb(head, use_bin_type=True),
                             msgpack.packb(data, use_bin_type=True)], flags=zmq.NOBLOCK)


def address_for(transport: str, tmp: Path, name: str) -> str:
    if transport == "ipc":
        return f"ipc://{tmp / name}.sock"
    with socket.socket() as probe:  # a free loopback port
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def dealer(ctx: zmq.Context, address: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    for option in (zmq.LINGER, zmq.SNDHWM, zmq.RCVHWM):
        sock.setsockopt(option, 0)
    sock.connect(address)
    return sock


def pings(sock: zmq.Socket, count: int) -> list[int]:
    """Round-trip times in ns of ``count`` sequential pings; only send -> receive is timed."""
    times: list[int] = []
    for _ in range(count):
        frames = encode_request("ping", {})
        start = time.perf_counter_ns()
        sock.send_multipart(frames)
        reply = sock.recv_multipart(copy=True)
        times.append(time.perf_counter_ns() - start)
        if decode_reply(reply).syscall != "ping":
            raise RuntimeError(f"unexpected reply: {reply!r}")
    return times


def start_kernel(address: str, home: Path, devices: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "llmos.kernel", "--home", str(home / "home"), "--listen", address,
           "--devices", devices, "--threads", "1"]
    with (home / "kernel.log").open("wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def wait_for_kernel(proc: subprocess.Popen[bytes], address: str, timeout: float) -> None:
    """Until ping answers and every device host has left STARTING/RESTARTING."""
    deadline = time.monotonic() + timeout
    with Client(address, timeout=2.0) as client:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the kernel exited with status {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the kernel was not ready within {timeout:g} s")
            try:
                client.ping(timeout=0.5)
                states = [d["state"] for d in client.devices()]
            except Exception:
                time.sleep(0.2)
                continue
            if all(state in SETTLED for state in states):
                print(f"kernel ready; device hosts: {states or 'none'}", file=sys.stderr)
                return
            time.sleep(0.5)


def summary(times: list[int]) -> dict[str, float]:
    ordered = sorted(times)

    def rank(q: float) -> float:  # nearest-rank percentile, in microseconds
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] / 1e3

    return {"p50_us": rank(0.50), "p99_us": rank(0.99), "mean_us": sum(ordered) / len(ordered) / 1e3,
            "n": len(ordered)}


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    echo_address = address_for(args.transport, tmp, "echo")
    kernel_address = address_for(args.transport, tmp, "kernel")
    spawn = mp.get_context("spawn")
    ready = spawn.Event()
    echo = spawn.Process(target=echo_server, args=(echo_address, ready), daemon=True)
    echo.start()
    kernel = start_kernel(kernel_address, tmp, args.devices)
    ctx = zmq.Context()
    try:
        if not ready.wait(30):
            raise RuntimeError("the echo server did not start")
        wait_for_kernel(kernel, kernel_address, args.start_timeout)
        time.sleep(args.settle)
        socks = {"echo": dealer(ctx, echo_address), "kernel": dealer(ctx, kernel_address)}
        for sock in socks.values():
            pings(sock, args.warmup)
        results: dict[str, list[int]] = {"echo": [], "kernel": []}
        per_round: list[dict[str, float]] = []
        for r in range(args.rounds):
            order = ["echo", "kernel"] if r % 2 == 0 else ["kernel", "echo"]
            this_round: dict[str, float] = {}
            for name in order:
                gc.collect()
                gc.disable()
                try:
                    times = pings(socks[name], args.count)
                finally:
                    gc.enable()
                results[name] += times
                this_round[f"{name}_p50_us"] = summary(times)["p50_us"]
            per_round.append(this_round)
            print(f"round {r + 1}/{args.rounds}: echo p50 {this_round['echo_p50_us']:.1f} us, "
                  f"kernel p50 {this_round['kernel_p50_us']:.1f} us", file=sys.stderr)
        for sock in socks.values():
            sock.close()
        with Client(kernel_address, timeout=10.0) as client:
            client.shutdown()
        kernel.wait(30)
    finally:
        if kernel.poll() is None:
            kernel.terminate()
            kernel.wait(10)
        echo.terminate()
        echo.join(5)
        ctx.term()
    echo_s, kernel_s = summary(results["echo"]), summary(results["kernel"])
    ratio = {k: kernel_s[f"{k}_us"] / echo_s[f"{k}_us"] for k in ("p50", "p99", "mean")}
    return {"transport": args.transport, "rounds": args.rounds, "count": args.count,
            "warmup": args.warmup, "echo": echo_s, "kernel": kernel_s, "ratio": ratio,
            "per_round": per_round, "target_p50_ratio": TARGET}


def report(res: dict[str, Any]) -> str:
    lines = [f"syscall overhead: ping over {res['transport']}, {res['rounds']} rounds x "
             f"{res['count']} pings per contender (one in flight)", "",
             f"{'contender':<14}{'p50 us':>10}{'p99 us':>10}{'mean us':>10}"]
    for name, label in (("echo", "raw echo"), ("kernel", "kernel ping")):
        s = res[name]
        lines.append(f"{label:<14}{s['p50_us']:>10.1f}{s['p99_us']:>10.1f}{s['mean_us']:>10.1f}")
    r = res["ratio"]
    lines.append(f"{'kernel/echo':<14}{r['p50']:>9.2f}x{r['p99']:>9.2f}x{r['mean']:>9.2f}x")
    lines += ["", f"kernel p50 / raw echo p50 = {r['p50']:.2f}x (target <= {TARGET}x)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=2000, help="pings per contender per round")
    parser.add_argument("--warmup", type=int, default=500, help="untimed pings per contender first")
    parser.add_argument("--transport", choices=("tcp", "ipc"), default="tcp")
    parser.add_argument("--devices", default="", help="the kernel's --devices (default: all probed)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds to wait once ready")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="llmos-bench-") as tmp:
        try:
            res = measure(args, Path(tmp))
        except Exception:
            log = Path(tmp) / "kernel.log"
            if log.exists():
                sys.stderr.write(log.read_text(errors="replace")[-4000:])
            raise
    print(report(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
