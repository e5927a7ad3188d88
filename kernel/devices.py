"""Driver hosts: spawn one worker process per device, watch it, restart it when it dies.

The :class:`DeviceManager` lives on the kernel's scheduling thread and owns the backend
ROUTER socket the hosts connect to. It knows processes, heartbeats and tasks in flight; it
knows nothing of jobs' meaning. Deaths are reported to the caller with the tasks that were
in flight, so the caller (the core) decides to requeue or fail them. Each incarnation of a
host has its own socket identity, so late messages from a dead one are ignored.

Two timeouts watch a host (docs/architecture.md, "Faults"). A host sends a heartbeat every
``HEARTBEAT_INTERVAL`` (0.25 s) from its IO thread, even while it computes. Silent for
``stall_timeout`` (0.75 s by default), it is STALLED: it takes no new work, its hardware
counts as free again (so the other hosts on that CPU keep serving), and its ``run``,
``stage`` and ``generate`` tasks are offered to the caller, which may :meth:`take_back`
those that another host can run (the first result wins; a late one from the stalled host
is ignored). A heartbeat makes it READY again. Silent for ``heartbeat_timeout`` (10 s), it
is killed and restarted as a dead one.
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import psutil
import zmq

from llmos.contract import hostwire
from llmos.contract.hostwire import REASSIGNABLE_TASK_OPS, STREAMING_TASK_OPS, HostMessage, TaskOp

from .jobs import Job
from .registries import DriverSpec

log = logging.getLogger(__name__)

_task_ids = itertools.count(1)

#: Seconds without a message after which a host is STALLED (three missed heartbeats).
DEFAULT_STALL_TIMEOUT = 3 * hostwire.HEARTBEAT_INTERVAL


class HostState(enum.StrEnum):
    STARTING = "STARTING"
    READY = "READY"
    #: Silent past the stall timeout: no new work, its hardware free for the others.
    STALLED = "STALLED"
    RESTARTING = "RESTARTING"
    FAILED = "FAILED"
    STOPPED = "STOPPED"


def hardware_of(device: str) -> str:
    """``cpu`` for every CPU slot; an accelerator is its own hardware (``cuda:0``, ``gpu``)."""
    return "cpu" if device == "cpu" or device.startswith("cpu:") else device


@dataclass(slots=True)
class Task:
    """One message to a host and what it was for; ``jobs`` is empty for internal reloads."""

    op: str
    payload: dict[str, Any]
    jobs: list[Job] = field(default_factory=list)
    #: Tensor frames sent after the payload (activations for a pipeline ``stage`` task).
    buffers: list[bytes] = field(default_factory=list)
    id: int = field(default_factory=lambda: next(_task_ids))
    sent_at: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class DeviceHost:
    """One device slot (``driver:device``) and the worker process serving it."""

    name: str
    spec: DriverSpec
    device: str
    threads: int
    #: Batches it is asked to run at once (each on ``threads // streams`` threads).
    requested_streams: int = 1
    state: HostState = HostState.STARTING
    process: subprocess.Popen[bytes] | None = None
    identity: bytes = b""
    token: str = ""
    generation: int = 0
    spawned_at: float = 0.0
    last_seen: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    rss: int = 0
    inflight: dict[int, Task] = field(default_factory=dict)
    #: handle -> what the driver reported when it loaded it.
    loaded: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: handle -> load payload; reloaded after a restart.
    wanted: dict[str, dict[str, Any]] = field(default_factory=dict)
    restarts: int = 0
    #: Tasks ever sent to it (the scheduler's last tie-break: round robin among equals).
    submitted: int = 0
    #: A slice of the hardware of its own (a replica or pipeline stage on CPU threads):
    #: it runs batches at the same time as the other slots of that hardware.
    lane: str = ""
    #: What a replica or stage host was started for (``model``, ``replica``/``stage``...);
    #: empty for the device slots the kernel starts with.
    role: dict[str, Any] = field(default_factory=dict)
    crashes_in_a_row: int = 0
    restart_at: float = 0.0
    last_error: str = ""

    @property
    def streams(self) -> int:
        """Batches it runs at once: what its driver granted of the ``streams`` asked for."""
        return max(1, int(self.info.get("streams", 1)))

    @property
    def free_slots(self) -> int:
        """How many more tasks it takes now: 0 unless ready; streaming tasks (which it
        interleaves) take no slot, ``run`` batches one stream each, any other task all."""
        if self.state is not HostState.READY:
            return 0
        running = [task.op for task in self.inflight.values() if task.op not in STREAMING_TASK_OPS]
        if any(op != TaskOp.RUN for op in running):
            return 0
        return max(0, self.streams - len(running))

    @property
    def hardware(self) -> str:
        """What this slot runs on; slots on one hardware run one at a time (a lane is a
        separate slice of its hardware)."""
        return f"{hardware_of(self.device)}/{self.lane}" if self.lane else hardware_of(self.device)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "driver": self.spec.name, "device": self.device,
            "state": str(self.state), "pid": self.process.pid if self.process else None,
            "hardware": self.hardware, "threads": self.threads, "streams": self.streams,
            "rss": self.rss, "info": self.info,
            "loaded": sorted(self.loaded), "inflight": len(self.inflight),
            "restarts": self.restarts, "last_error": self.last_error, "role": self.role,
        }


@dataclass(slots=True)
class HostEvent:
    """What happened to a host: ``ready``, ``done`` (a task finished), ``stream`` (events of
    streaming tasks: ``body["events"]``), ``stalled`` (``lost``: the tasks it may give back,
    still in flight) or ``died``."""

    kind: str
    host: DeviceHost
    task: Task | None = None
    body: dict[str, Any] = field(default_factory=dict)
    buffers: list[bytes] = field(default_factory=list)
    #: For ``died``: every task that was in flight; for ``stalled``: those it may give back.
    lost: list[Task] = field(default_factory=list)


class DeviceManager:
    """Spawns and supervises driver hosts; call :meth:`receive` and :meth:`check` each pass."""

    #: A host that dies this many times in a row without finishing a task is given up.
    MAX_CRASHES_IN_A_ROW = 5

    def __init__(self, ctx: zmq.Context, run_dir: Path, log_dir: Path,
                 heartbeat_timeout: float, start_timeout: float,
                 stall_timeout: float = DEFAULT_STALL_TIMEOUT) -> None:
        self.hosts: dict[str, DeviceHost] = {}
        self.heartbeat_timeout = heartbeat_timeout
        self.stall_timeout = min(stall_timeout, heartbeat_timeout)
        self.start_timeout = start_timeout
        self.log_dir = log_dir
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.setsockopt(zmq.RCVHWM, 0)
        _sweep_backend_sockets(run_dir)
        path = run_dir / f"backend-{os.getpid()}.sock"
        if len(str(path)) > 100:  # too long for a Unix socket: a private (0700) temp folder
            path = Path(tempfile.mkdtemp(prefix="llmos-")) / "backend.sock"
        self.socket.bind(f"ipc://{path}")
        self._socket_path = path
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._by_identity: dict[bytes, DeviceHost] = {}

    # --- lifecycle --------------------------------------------------------------------

    def add(self, spec: DriverSpec, device: str, threads: int, name: str = "", lane: str = "",
            role: dict[str, Any] | None = None, streams: int = 1) -> DeviceHost:
        """Start a host for ``spec`` on ``device`` (named ``driver:device`` unless ``name``),
        asking its driver for ``streams`` concurrent batches."""
        host = DeviceHost(name or f"{spec.name}:{device}", spec, device, threads,
                          requested_streams=streams, lane=lane, role=role or {})
        self.hosts[host.name] = host
        self._spawn(host)
        return host

    def remove(self, name: str, timeout: float = 5.0) -> None:
        """Stop host ``name`` (it finishes its current task) and forget it."""
        host = self.hosts.pop(name)
        self._by_identity = {h.identity: h for h in self.hosts.values()}
        host.state = HostState.STOPPED
        if host.process is not None and host.process.poll() is None:
            self._send(host, [HostMessage.STOP])
            try:
                host.process.wait(timeout)
            except subprocess.TimeoutExpired:
                host.process.kill()
                host.process.wait()

    def _spawn(self, host: DeviceHost) -> None:
        host.generation += 1
        host.identity = f"{host.name}#{host.generation}".encode()
        host.token = secrets.token_hex(16)
        host.state = HostState.STARTING
        host.spawned_at = host.last_seen = time.monotonic()
        self._by_identity = {h.identity: h for h in self.hosts.values()}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        logfile = open(self.log_dir / f"host-{host.name.replace(':', '-')}.log", "ab")  # noqa: SIM115
        env = {**os.environ, hostwire.TOKEN_ENV: host.token}
        host.process = subprocess.Popen(
            [sys.executable, "-m", "llmos.drivers.host", "--connect", self.address,
             "--driver", host.spec.qualname, "--device", host.device,
             "--identity", host.identity.decode(), "--threads", str(host.threads),
             "--streams", str(host.requested_streams)],
            stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT, env=env,
        )
        logfile.close()
        log.info("spawned %s pid %d", host.name, host.process.pid)

    def stop_all(self, timeout: float = 5.0) -> None:
        for host in self.hosts.values():
            if host.process and host.process.poll() is None:
                self._send(host, [HostMessage.STOP])
            host.state = HostState.STOPPED
        deadline = time.monotonic() + timeout
        for host in self.hosts.values():
            if host.process is None:
                continue
            try:
                host.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                host.process.kill()
                host.process.wait()
        self.socket.close()
        self._socket_path.unlink(missing_ok=True)

    # --- traffic ----------------------------------------------------------------------

    def submit(self, host: DeviceHost, task: Task) -> None:
        """Send ``task`` to ``host`` and track it until DONE or the host dies."""
        host.inflight[task.id] = task
        host.submitted += 1
        self._send(host, [HostMessage.TASK, hostwire.pack({"task": task.id, "op": task.op,
                                                        **task.payload}), *task.buffers])

    def _send(self, host: DeviceHost, frames: list[bytes]) -> None:
        try:
            self.socket.send_multipart([host.identity, *frames], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # not connected (yet/anymore): check() will notice
            log.warning("send to %s failed: %s", host.name, exc)

    def receive(self) -> list[HostEvent]:
        """Drain the backend socket without blocking; the events for the core."""
        events: list[HostEvent] = []
        while True:
            try:
                frames = self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return events
            host = self._by_identity.get(frames[0])
            if host is None or len(frames) < 3:
                continue  # a dead incarnation, or not a host at all
            kind = frames[1]
            try:
                body = msgpack.unpackb(frames[2], raw=False)
            except Exception:
                continue
            if not isinstance(body, dict):
                continue
            host.last_seen = time.monotonic()
            if host.state is HostState.STALLED:
                host.state = HostState.READY
                log.warning("%s answers again", host.name)
            if kind == HostMessage.HEARTBEAT:
                host.rss = int(body.get("rss", 0))
            elif kind == HostMessage.READY and host.state is HostState.STARTING:
                if body.get("token") != host.token or body.get("v") != hostwire.HOST_PROTOCOL_VERSION:
                    log.error("host %s sent a bad READY; ignoring it", host.name)
                    continue
                host.state = HostState.READY
                host.info = body.get("info", {})
                events.append(HostEvent("ready", host))
            elif kind == HostMessage.START_FAILED:
                host.last_error = str(body.get("message", "driver failed to start"))
                events.extend(self._kill(host, host.last_error, give_up=True))
            elif kind == HostMessage.STREAM and isinstance(body.get("events"), list):
                events.append(HostEvent("stream", host, body=body))
            elif kind == HostMessage.DONE:
                task = host.inflight.pop(body.get("task", -1), None)
                if task is not None:
                    host.crashes_in_a_row = 0
                    host.rss = int(body.get("rss", host.rss))
                    events.append(HostEvent("done", host, task, body, frames[3:]))

    def check(self, now: float) -> list[HostEvent]:
        """Detect dead or silent hosts (reported as ``died``) and restart those due."""
        events: list[HostEvent] = []
        for host in self.hosts.values():
            if host.state in (HostState.STARTING, HostState.READY, HostState.STALLED):
                code = host.process.poll() if host.process else None
                silent = now - host.last_seen
                if code is not None:
                    events.extend(self._kill(host, f"driver host exited with status {code}"))
                elif host.state is not HostState.STARTING and silent > self.heartbeat_timeout:
                    events.extend(self._kill(host, "driver host stopped sending heartbeats"))
                elif host.state is HostState.READY and silent > self.stall_timeout:
                    events.append(self._stall(host, silent))
                elif host.state is HostState.STARTING and now - host.spawned_at > self.start_timeout:
                    events.extend(self._kill(host, "driver host did not become ready in time"))
            elif host.state is HostState.RESTARTING and now >= host.restart_at:
                host.restarts += 1
                self._spawn(host)
        return events

    def _stall(self, host: DeviceHost, silent: float) -> HostEvent:
        """Mark ``host`` STALLED; the event offers its reassignable tasks."""
        host.state = HostState.STALLED
        log.warning("%s silent for %.1f s: stalled", host.name, silent)
        offered = [task for task in host.inflight.values() if task.op in REASSIGNABLE_TASK_OPS]
        return HostEvent("stalled", host, body={"reason": f"silent for {silent:.1f} s"},
                         lost=offered)

    @staticmethod
    def take_back(host: DeviceHost, task: Task) -> None:
        """Stop waiting for ``task`` on ``host`` (it runs elsewhere; a late DONE is ignored)."""
        host.inflight.pop(task.id, None)

    def _kill(self, host: DeviceHost, reason: str, give_up: bool = False) -> list[HostEvent]:
        if host.process and host.process.poll() is None:
            host.process.kill()
            host.process.wait()
        lost = list(host.inflight.values())
        host.inflight.clear()
        host.loaded.clear()
        host.last_error = reason
        host.crashes_in_a_row += 1
        if give_up or host.crashes_in_a_row >= self.MAX_CRASHES_IN_A_ROW:
            host.state = HostState.FAILED
            log.error("%s failed for good: %s", host.name, reason)
        else:
            host.state = HostState.RESTARTING
            host.restart_at = time.monotonic() + min(10.0, 0.25 * 2 ** (host.crashes_in_a_row - 1))
            log.warning("%s died (%s); restarting", host.name, reason)
        return [HostEvent("died", host, body={"reason": reason}, lost=lost)]


def _sweep_backend_sockets(run_dir: Path) -> None:
    """Remove the backend sockets of kernels that are no longer running (``backend-PID.sock``
    left by one that was killed)."""
    for path in run_dir.glob("backend-*.sock"):
        pid = path.stem.removeprefix("backend-")
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            path.unlink(missing_ok=True)
