"""The kernel process: the client socket on an IO thread, the scheduling loop on another.

The IO thread owns the client-facing ROUTER. It decodes and validates every message
(malformed ones are answered with BAD_REQUEST/UNKNOWN_SYSCALL right there), answers
``ping`` and ``info`` itself, hands other requests to the core through an in-memory inbox,
and forwards the core's ready-made replies. The main thread only waits for a signal or
for the core to stop.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

import llmos
from llmos.contract.protocol import (
    PROTOCOL_VERSION,
    ErrorCode,
    KernelError,
    decode,
    encode_error,
    encode_reply,
)
from llmos.contract.syscalls import SYSCALLS

from .config import KernelConfig
from .core import DOORBELL, OUTBOX, KernelCore
from .kinds import Counters, Request
from .output import keep_output_from_failing
from .plugins import collect, disabled_from_env, get_plugin_manager, plugin_names
from .registry import Registry
from .scheduler import BatchingConfig
from .security import LOCAL_PRINCIPAL, AuditLog, CurveServer, KeyStore, Principal

log = logging.getLogger(__name__)

#: Replies queued per client connection before ZeroMQ would drop them. Admission control
#: keeps each client far below this (max_jobs_per_client), so a reply is never dropped
#: silently; a send that fails anyway (peer gone, peer not reading) is counted.
FRONTEND_HWM = 100_000
#: Messages the IO thread moves in one go (each way) before it polls again.
IO_BURST = 256
#: Most ``--streams`` a kernel may ask its driver hosts for.
MAX_STREAMS = 64


def pid_file(config: KernelConfig) -> Path:
    return config.run_dir / "kernel.json"


def read_pid_file(home: Path) -> dict[str, Any] | None:
    """The running kernel's {pid, address} recorded under ``home``, if its process lives."""
    try:
        record = json.loads((home / "run" / "kernel.json").read_text())
        os.kill(int(record["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record


@dataclass(frozen=True, slots=True)
class IpcFile:
    """The socket file a kernel bound for an ``ipc://`` address, and its inode."""

    path: Path
    inode: int

    def remove(self) -> None:
        """Unlink the file if it is still the one this kernel bound (a kernel started later
        on the same path owns the file now and keeps it)."""
        try:
            if self.path.stat().st_ino == self.inode:
                self.path.unlink()
        except FileNotFoundError:
            pass


class KernelServer:
    """One kernel: plugins, registry, IO thread and scheduling loop."""

    def __init__(self, config: KernelConfig) -> None:
        self.config = config
        config.home.mkdir(parents=True, exist_ok=True)
        config.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(config.run_dir, 0o700)
        running = read_pid_file(config.home)
        if running and running["pid"] != os.getpid():
            raise KernelError(ErrorCode.BUSY, f"a kernel (pid {running['pid']}) is already "
                              f"running at {running['address']} for {config.home}")
        self.pm = get_plugin_manager(disabled_from_env())
        self.ext = collect(self.pm)
        self.ext.policies.get(config.policy)  # fail fast on an unknown policy or driver
        for slot in config.devices:
            self.ext.drivers.get(slot.partition(":")[0])
        self.registry = Registry(config.home)
        self.audit = AuditLog(config.home)
        self.curve = CurveServer(KeyStore(config.home)) if config.curve else None
        if self.curve is not None:
            self.curve.store.server_keys()  # fail fast, saying how to create them
        self.ctx = zmq.Context()
        self.counters = Counters()
        self.inbox: deque[Request] = deque()
        self.core = KernelCore(config, self.pm, self.ext, self.registry, self.ctx,
                               self.counters, self.inbox, self.audit)
        self.started = time.time()
        self._info = {
            "version": llmos.__version__, "protocol": PROTOCOL_VERSION, "pid": os.getpid(),
            "address": config.address, "home": str(config.home), "policy": config.policy,
            "plugins": plugin_names(self.pm),
        }
        self._io_ready = threading.Event()
        self._io_error: BaseException | None = None

    def serve(self) -> None:
        """Run until ``shutdown`` or SIGTERM/SIGINT; clean up the pid file."""
        core = threading.Thread(target=self.core.run, name="llmos-core")
        core.start()
        io = threading.Thread(target=self._io_loop, name="llmos-io")
        io.start()
        self._io_ready.wait()
        if self._io_error is not None:
            self.core.stop_requested.set()
            core.join()
            io.join()
            raise self._io_error
        pid_file(self.config).write_text(
            json.dumps({"pid": os.getpid(), "address": self.config.address}))
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.core.stop_requested.set())
        log.info("llmos kernel %s listening on %s", llmos.__version__, self.config.address)
        try:
            while core.is_alive():
                core.join(0.2)
        finally:
            self.core.stop_requested.set()
            core.join()
            io.join()
            pid_file(self.config).unlink(missing_ok=True)
            self.registry.close()
            if self.curve is not None:
                self.curve.stop()
            self.ctx.term()

    # --- the IO thread ----------------------------------------------------------------

    def _io_loop(self) -> None:
        try:
            frontend = self.ctx.socket(zmq.ROUTER)
            frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)
            frontend.setsockopt(zmq.SNDHWM, FRONTEND_HWM)
            frontend.setsockopt(zmq.RCVHWM, FRONTEND_HWM)
            # Hard cap per frame: a peer sending more is disconnected by libzmq before we
            # allocate it. Below the cap, oversize messages get a BAD_REQUEST reply.
            frontend.setsockopt(zmq.MAXMSGSIZE, 4 * self.config.max_message_bytes)
            frontend.setsockopt(zmq.LINGER, 1000)
            if self.curve is not None:
                self.curve.start(self.ctx)
                self.curve.secure(frontend)
            frontend.bind(self.config.address)
            socket_file = self._ipc_file()
            if socket_file is not None:
                os.chmod(socket_file.path, 0o600)
            outbox = self.ctx.socket(zmq.PULL)
            outbox.bind(OUTBOX)
            doorbell = self.ctx.socket(zmq.PUSH)
            doorbell.setsockopt(zmq.SNDHWM, 0)  # a ring is an empty frame; never block or drop
            doorbell.connect(DOORBELL)
        except Exception as exc:
            self._io_error = exc
            self._io_ready.set()
            return
        self._io_ready.set()
        sockets = [(outbox, zmq.POLLIN), (frontend, zmq.POLLIN)]
        while True:
            ready = {socket for socket, _ in zmq.zmq_poll(sockets)}  # cheaper than a Poller
            if outbox in ready and not self._forward_replies(frontend, outbox, doorbell):
                break
            if frontend in ready:
                self._take_requests(frontend, doorbell)
        frontend.close()
        outbox.close()
        doorbell.close()
        if socket_file is not None:
            socket_file.remove()

    def _ipc_file(self) -> IpcFile | None:
        """The socket file just bound, for an ``ipc://`` address; None for tcp."""
        if not self.config.address.startswith("ipc://"):
            return None
        path = Path(self.config.address[len("ipc://"):])
        return IpcFile(path, path.stat().st_ino)

    def _forward_replies(self, frontend: zmq.Socket, outbox: zmq.Socket, doorbell: zmq.Socket) -> bool:
        """Send the core's waiting replies (at most ``IO_BURST``); False once the core has
        said nothing more is coming."""
        for _ in range(IO_BURST):
            try:
                frames = outbox.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                break
            if frames == [b""]:
                return False
            if not self._send(frontend, frames):  # the client is gone: stop its streams
                self.core.gone.append(frames[0])
                self._ring(doorbell)
        return True

    def _take_requests(self, frontend: zmq.Socket, doorbell: zmq.Socket) -> None:
        """Decode the waiting requests (at most ``IO_BURST``) into the core's inbox and ring
        its doorbell once."""
        for _ in range(IO_BURST):
            try:
                frames, principal = self._receive(frontend)
            except zmq.Again:
                break
            self._on_frames(frontend, frames, principal)
        if self.inbox:
            self._ring(doorbell)

    def _ring(self, doorbell: zmq.Socket) -> None:
        """Wake the core unless it was woken since it last emptied its inbox (it clears
        ``rung`` before it drains, so nothing appended before this call waits unseen)."""
        if not self.core.rung:
            self.core.rung = True
            doorbell.send(b"")

    def _receive(self, frontend: zmq.Socket) -> tuple[list[bytes], Principal]:
        """One message's frames and who sent it (the CURVE key's name, or the local user)."""
        if self.curve is None:
            return frontend.recv_multipart(zmq.NOBLOCK, copy=True), LOCAL_PRINCIPAL
        frames = frontend.recv_multipart(zmq.NOBLOCK, copy=False)
        principal = self.curve.principal(frames[-1].get("User-Id"))
        return [frame.bytes for frame in frames], principal

    def _on_frames(self, frontend: zmq.Socket, frames: list[bytes], principal: Principal) -> None:
        self.counters.received += 1
        identity, rest = frames[0], frames[1:]
        msg_id: str | None = None
        syscall = ""
        try:
            msg = decode(rest, self.config.max_message_bytes)
            msg_id, syscall = msg.msg_id, msg.syscall
            if msg.kind != "request":
                raise KernelError(ErrorCode.BAD_REQUEST, f"expected a request, got a {msg.kind}")
            spec = SYSCALLS.get(msg.syscall)
            if spec is None:
                raise KernelError(ErrorCode.UNKNOWN_SYSCALL,
                                  f"unknown syscall {msg.syscall!r}; known: {', '.join(SYSCALLS)}")
            args = spec.parse(msg.body)
            principal.check(syscall)
        except KernelError as exc:
            self.counters.rejected += 1
            if exc.code is ErrorCode.DENIED:
                self.audit.record(principal.name, syscall, {}, str(exc.code))
            self._send(frontend, [identity, *encode_error(
                msg_id or getattr(exc, "msg_id", None), syscall, exc.code, exc.message)])
            return
        except Exception as exc:  # a bug in validation must not take the IO thread down
            log.exception("could not validate a request")
            self.counters.rejected += 1
            self._send(frontend, [identity, *encode_error(
                msg_id, syscall, ErrorCode.BAD_REQUEST, f"malformed request ({type(exc).__name__})")])
            return
        if syscall == "ping":
            self._send(frontend, [identity, *encode_reply(msg_id, syscall, {"pong": True})])
        elif syscall == "info":
            info = {**self._info, "uptime": time.time() - self.started}
            self._send(frontend, [identity, *encode_reply(msg_id, syscall, info)])
        else:
            self.inbox.append(Request(identity, msg, spec, args, principal,
                                      size=sum(len(frame) for frame in rest)))

    def _send(self, frontend: zmq.Socket, frames: list[bytes]) -> bool:
        """Send; False only when the peer is gone (EHOSTUNREACH)."""
        try:
            frontend.send_multipart(frames, flags=zmq.NOBLOCK)
            self.counters.replies += 1
        except zmq.ZMQError as exc:  # peer gone (EHOSTUNREACH) or not reading (EAGAIN)
            self.counters.dropped_replies += 1
            return exc.errno != zmq.EHOSTUNREACH
        return True


def main(argv: list[str] | None = None) -> int:
    """``python -m llmos.kernel``: run a kernel in the foreground."""

    parser = argparse.ArgumentParser(prog="python -m llmos.kernel")
    add_kernel_options(parser)
    args = parser.parse_args(argv)
    keep_output_from_failing()  # its log is a file under LLMOS_HOME: a full disk fails nothing
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        server = KernelServer(config_from_args(args))
    except KernelError as exc:  # a bad configuration: one line saying what to do
        print(f"error {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    server.serve()
    return 0


def _streams(text: str) -> int:
    """``--streams``: a whole number from 1 to MAX_STREAMS."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_STREAMS:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to {MAX_STREAMS}, got {text!r}")
    return value


def add_kernel_options(parser: Any) -> None:
    parser.add_argument("--home", help="LLMOS_HOME (default ~/.llmos)")
    parser.add_argument("--listen", help="ipc://PATH or tcp://127.0.0.1:PORT")
    parser.add_argument("--policy", default="priority", help="scheduling policy plugin")
    parser.add_argument("--devices", default="", help="comma list of driver:device slots")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--streams", type=_streams, default=1, metavar="N",
                        help="batches a driver host runs at once, its threads split among them")
    parser.add_argument("--max-jobs-per-client", type=int, default=256)
    parser.add_argument("--max-mb-per-client", type=int, default=256, metavar="MB",
                        help="bytes of requests one client's unfinished jobs may hold")
    fixed = BatchingConfig()
    parser.add_argument("--max-batch-size", type=int, metavar="N",
                        help="fixed batching knobs instead of adaptive batching: at most N "
                             f"inputs a batch (default {fixed.max_batch_size})")
    parser.add_argument("--max-queue-delay-ms", type=float, metavar="MS",
                        help="fixed batching knobs instead of adaptive batching: a partial "
                             f"batch waits MS (default {fixed.max_queue_delay * 1000:g})")
    parser.add_argument("--memory-budget-mb", type=int, help="model memory per hardware")
    parser.add_argument("--update-after", type=int, default=0, metavar="N",
                        help="update a classifier from its feedback every N new examples")
    parser.add_argument("--curve", action="store_true",
                        help="require CURVE keys from the allowlist (forced beyond loopback)")
    parser.add_argument("--no-restore", dest="restore", action="store_false",
                        help="start with nothing loaded (by default the models loaded when "
                             "the kernel last stopped are loaded again)")


def kernel_argv(args: Any) -> list[str]:
    """The options of :func:`add_kernel_options` back as command-line arguments."""
    argv = ["--policy", args.policy, "--devices", args.devices, "--threads", str(args.threads),
            "--streams", str(args.streams), "--max-jobs-per-client", str(args.max_jobs_per_client),
            "--max-mb-per-client", str(args.max_mb_per_client),
            "--update-after", str(args.update_after)]
    if args.max_batch_size is not None:
        argv += ["--max-batch-size", str(args.max_batch_size)]
    if args.max_queue_delay_ms is not None:
        argv += ["--max-queue-delay-ms", str(args.max_queue_delay_ms)]
    if args.memory_budget_mb is not None:
        argv += ["--memory-budget-mb", str(args.memory_budget_mb)]
    if args.curve:
        argv.append("--curve")
    if not args.restore:
        argv.append("--no-restore")
    return argv + (["--listen", args.listen] if args.listen else [])


def batching_from_args(args: Any) -> BatchingConfig:
    """Fixed knobs when ``--max-batch-size`` or ``--max-queue-delay-ms`` is given (the other
    at its default); else adaptive batching."""
    if args.max_batch_size is None and args.max_queue_delay_ms is None:
        return BatchingConfig(adaptive=True)
    default = BatchingConfig()
    size = default.max_batch_size if args.max_batch_size is None else args.max_batch_size
    delay = default.max_queue_delay if args.max_queue_delay_ms is None \
        else args.max_queue_delay_ms / 1000
    return BatchingConfig(size, delay)


def config_from_args(args: Any) -> KernelConfig:
    from .config import default_home

    home = Path(args.home).expanduser() if args.home else default_home()
    return KernelConfig(
        home=home, address=args.listen or "", policy=args.policy,
        devices=tuple(d for d in args.devices.split(",") if d), threads=args.threads,
        streams=args.streams, max_jobs_per_client=args.max_jobs_per_client,
        max_bytes_per_client=args.max_mb_per_client * 2**20,
        batching=batching_from_args(args),
        memory_budget=args.memory_budget_mb * 2**20 if args.memory_budget_mb else None,
        curve=args.curve, update_after=args.update_after, restore=args.restore,
    )
