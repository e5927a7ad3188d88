"""Syscall overhead: llmos round trips against a bare ZeroMQ + msgpack echo, interleaved.

One request in flight at a time, over the same transport (tcp loopback by default, or ipc):

* ``bare-echo``: a bare pyzmq DEALER in this process packs a small msgpack map, sends it to
  a ROUTER in another (spawned) process that unpacks it and packs it back, and unpacks the
  reply: the least any msgpack-over-ZeroMQ request/reply must do, i.e. the floor;
* ``raw-ping``: the same bare DEALER sends ready-made ``ping`` frames
  (``encode_request("ping", {})``) to a real ``python -m llmos.kernel`` and decodes the reply
  with ``decode_reply`` after the timed send -> receive: the kernel's IO thread alone
  (decode, validation, syscall lookup, reply encoding);
* ``client-ping``: ``llmos.Client.ping()``, the whole call: the client library's encoding,
  waiting and decoding plus the IO thread;
* ``client-noop``: ``Client.submit("noop", {}).result()``: the ``noop`` syscall, which the
  IO thread hands to the scheduling loop and the loop answers (inbox, doorbell, loop pass,
  outbox): the round trip of every syscall that is not ``ping`` or ``info``.

The echo server and the kernel are separate processes with their own ZeroMQ context and
ROUTERs with the kernel's socket options; each contender has its own DEALER with the
client's options. R rounds of N calls per contender, the order rotated every round, after
the same warm-up for every contender, the garbage collector off while timing
(``time.perf_counter_ns``); the kernel is measured once its device hosts have finished
starting. Every round's p50 is printed; the table pools all rounds. Targets (issue 18):
client-ping p50 <= 1.5x bare-echo p50, and client-ping p99 <= 3x its own p50. Numbers on a
small shared box are noisy.

Run: ``.venv/bin/python bench/syscall_overhead.py [--rounds 5] [--count 2000]
[--transport tcp|ipc] [--devices ""] [--json out.json]``.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import zmq

from llmos import Client
from llmos.contract.protocol import decode_reply, encode_request

#: Targets: client-ping p50 against bare-echo p50, and client-ping p99 against its own p50.
TARGET_P50 = 1.5
TARGET_TAIL = 3.0
SETTLED = {"READY", "FAILED", "STOPPED"}
NAMES = ("bare-echo", "raw-ping", "client-ping", "client-noop")
#: The bare echo's request: a map the size of a ping's header.
ECHO_BODY = {"v": 1, "id": "0123456789abcdef0", "kind": "request", "syscall": "ping",
             "client": "bench"}


def echo_server(address: str, ready: Any) -> None:
    """The bare echo: unpack each message's frames, pack them back (a spawned process)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    for option, value in ((zmq.ROUTER_MANDATORY, 1), (zmq.SNDHWM, 100_000), (zmq.RCVHWM, 100_000),
                          (zmq.MAXMSGSIZE, 64 * 1024 * 1024)):  # as the kernel's frontend
        sock.setsockopt(option, value)
    sock.bind(address)
    ready.set()
    while True:
        identity, *frames = sock.recv_multipart(copy=True)
        sock.send_multipart([identity, *(msgpack.packb(msgpack.unpackb(f, raw=False),
                                                       use_bin_type=True) for f in frames)],
                            flags=zmq.NOBLOCK)


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


def bare_echo(sock: zmq.Socket, count: int) -> list[int]:
    """Round-trip times in ns: pack, send, receive, unpack, all timed."""
    times: list[int] = []
    for _ in range(count):
        start = time.perf_counter_ns()
        sock.send(msgpack.packb(ECHO_BODY, use_bin_type=True))
        reply = msgpack.unpackb(sock.recv(copy=True), raw=False)
        times.append(time.perf_counter_ns() - start)
        if reply != ECHO_BODY:
            raise RuntimeError(f"unexpected echo: {reply!r}")
    return times


def raw_pings(sock: zmq.Socket, count: int) -> list[int]:
    """Round-trip times in ns of ready-made ping frames; only send -> receive is timed."""
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


def client_calls(call: Callable[[], Any], count: int) -> list[int]:
    """Times in ns of ``count`` whole client calls."""
    times: list[int] = []
    for _ in range(count):
        start = time.perf_counter_ns()
        call()
        times.append(time.perf_counter_ns() - start)
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
        echo_sock, raw_sock = dealer(ctx, echo_address), dealer(ctx, kernel_address)
        client = Client(kernel_address, name="bench", timeout=10.0)
        noop = client.submit("noop", {}).result  # fail here, not in a timed round, if absent
        noop()
        contenders: dict[str, Callable[[int], list[int]]] = {
            "bare-echo": lambda n: bare_echo(echo_sock, n),
            "raw-ping": lambda n: raw_pings(raw_sock, n),
            "client-ping": lambda n: client_calls(client.ping, n),
            "client-noop": lambda n: client_calls(lambda: client.submit("noop", {}).result(), n),
        }
        for run in contenders.values():
            run(args.warmup)
        results: dict[str, list[int]] = {name: [] for name in NAMES}
        per_round: list[dict[str, float]] = []
        for r in range(args.rounds):
            order = NAMES[r % len(NAMES):] + NAMES[:r % len(NAMES)]
            this_round: dict[str, float] = {}
            for name in order:
                gc.collect()
                gc.disable()
                try:
                    times = contenders[name](args.count)
                finally:
                    gc.enable()
                results[name] += times
                this_round[name] = summary(times)["p50_us"]
            per_round.append(this_round)
            print(f"round {r + 1}/{args.rounds} p50 us: " + ", ".join(
                f"{name} {this_round[name]:.1f}" for name in NAMES), file=sys.stderr)
        echo_sock.close()
        raw_sock.close()
        client.shutdown()
        client.close()
        kernel.wait(30)
    finally:
        if kernel.poll() is None:
            kernel.terminate()
            kernel.wait(10)
        echo.terminate()
        echo.join(5)
        ctx.term()
    stats = {name: summary(results[name]) for name in NAMES}
    ping, echo_s = stats["client-ping"], stats["bare-echo"]
    return {"transport": args.transport, "rounds": args.rounds, "count": args.count,
            "warmup": args.warmup, "devices": args.devices, **stats, "per_round": per_round,
            "client_ping_vs_echo_p50": ping["p50_us"] / echo_s["p50_us"],
            "client_ping_p99_vs_p50": ping["p99_us"] / ping["p50_us"],
            "targets": {"client_ping_vs_echo_p50": TARGET_P50, "client_ping_p99_vs_p50": TARGET_TAIL}}


def report(res: dict[str, Any]) -> str:
    lines = [f"syscall overhead over {res['transport']}: {res['rounds']} rounds x "
             f"{res['count']} calls per contender (one in flight), order rotated", "",
             f"{'contender':<14}{'p50 us':>10}{'p99 us':>10}{'mean us':>10}{'p99/p50':>10}"]
    for name in NAMES:
        s = res[name]
        lines.append(f"{name:<14}{s['p50_us']:>10.1f}{s['p99_us']:>10.1f}{s['mean_us']:>10.1f}"
                     f"{s['p99_us'] / s['p50_us']:>9.2f}x")
    ratio, tail = res["client_ping_vs_echo_p50"], res["client_ping_p99_vs_p50"]
    lines += ["", f"client-ping p50 / bare-echo p50 = {ratio:.2f}x (target <= {TARGET_P50}x: "
              f"{'met' if ratio <= TARGET_P50 else 'NOT met'})",
              f"client-ping p99 / its p50 = {tail:.2f}x (target <= {TARGET_TAIL}x: "
              f"{'met' if tail <= TARGET_TAIL else 'NOT met'})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=2000, help="calls per contender per round")
    parser.add_argument("--warmup", type=int, default=500, help="untimed calls per contender first")
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
