"""The scheduling loop: admit syscalls as jobs, schedule them onto devices, collect results.

:class:`KernelCore` runs on one thread and owns all job state. It never blocks on client
sockets: requests arrive already decoded through an in-memory inbox (rung by an inproc
doorbell), and replies leave as ready-made frames through an inproc socket that the IO
thread drains. Work runs in driver-host processes (or, for registry imports, a small
thread pool), so a pass of the loop takes microseconds and control syscalls never wait
behind work.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pluggy
import zmq

from llmos.contract.hostwire import BACKGROUND_TASK_OPS, TaskOp
from llmos.contract.protocol import (
    ErrorCode,
    KernelError,
    encode_error,
    encode_event,
    encode_reply,
)
from llmos.contract.states import JobState

from .compression import Compression
from .config import KernelConfig
from .control import Control
from .devices import DeviceHost, DeviceManager, HostEvent, HostState, Task
from .feedback import FeedbackStore
from .generation import Generation
from .inference import Inference
from .jobs import Job, JobHistory
from .kinds import KERNEL_DEVICE, Counters, Handler, JobKind, Request
from .learning import Learning
from .models import ModelOps
from .parallel import Parallel
from .placement import CostModel
from .plugins import Extensions
from .registry import Registry
from .scheduler import BatchingConfig, Devices, Scheduler
from .security import PRIVILEGED, AuditLog
from .swap import VersionSwap
from .training import Training
from .updates import Update

log = logging.getLogger(__name__)

#: Longest a loop pass sleeps when nothing is due, in seconds.
IDLE_POLL = 0.05
#: Seconds between two checks that the driver hosts live (a busy loop passes far more often).
HEALTH_CHECK_INTERVAL = 0.05

DOORBELL = "inproc://llmos-doorbell"
OUTBOX = "inproc://llmos-outbox"


class KernelCore:
    """All job state, the scheduler and the device manager; driven by :meth:`run`.

    It implements :class:`~llmos.kernel.kinds.Core` for the job kinds it builds, and asks
    each job's kind (``Job.kind``, set at admission) whatever depends on what the job is.
    """

    def __init__(self, config: KernelConfig, pm: pluggy.PluginManager, ext: Extensions,
                 registry: Registry, ctx: zmq.Context, counters: Counters,
                 inbox: deque[Request], audit: AuditLog) -> None:
        self.config, self.pm, self.ext, self.registry = config, pm, ext, registry
        self.feedback = FeedbackStore(config.home)
        self.ctx, self.counters, self.inbox, self.audit = ctx, counters, inbox, audit
        self.started = time.time()
        self.stop_requested = threading.Event()
        self.active: dict[int, Job] = {}
        self.history = JobHistory(config.history)
        self.per_owner: Counter[str] = Counter()
        #: Bytes of requests held by unfinished jobs, per owner (see admit).
        self.bytes_per_owner: Counter[str] = Counter()
        #: Peers the IO thread could not reach (disconnected); their streams are cancelled.
        self.gone: deque[bytes] = deque()
        #: True while the IO thread has rung the doorbell and the core has not yet drained.
        self.rung = False
        self.finished_by_state: Counter[str] = Counter()
        self._deadlines: list[tuple[float, int]] = []
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="llmos-kernel-task")
        self._kernel_task: tuple[Future[dict[str, Any]], Job] | None = None
        self.costs = CostModel()
        self.batching: BatchingConfig = config.batching
        policy = ext.policies.get(config.policy)()
        self.scheduler = Scheduler(policy)
        self._devices: DeviceManager | None = None
        self._outbox: zmq.Socket | None = None
        # The job kinds, given each other where one's work ends in another's.
        parallel = Parallel(self)
        self.models = ModelOps(self, parallel)
        self.swap = VersionSwap(self, self.models)
        self.training = Training(self, parallel)
        self.generation = Generation(self)
        self.update = Update(self, self.training, self.swap, self.feedback)
        self.learning = Learning(self, self.update, self.feedback)
        self.inference = Inference(self, self.learning, parallel)
        self.compression = Compression(self, self.training)
        self.control = Control(self, self.learning)
        kinds: tuple[JobKind, ...] = (self.control, self.models, self.swap, self.inference,
                                      self.generation, self.training, self.compression,
                                      self.update, self.learning)
        self._handlers: dict[str, Handler] = {}
        self._kind_of: dict[str, JobKind] = {}
        for kind in kinds:
            for name, handler in kind.handlers().items():
                self._handlers[name], self._kind_of[name] = handler, kind

    # --- the Core interface (kernel/kinds.py) -----------------------------------------

    @property
    def devices(self) -> DeviceManager:
        assert self._devices is not None, "the loop has not started"
        return self._devices

    def hosts(self) -> dict[str, DeviceHost]:
        return self.devices.hosts

    # --- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        """Serve until ``shutdown``; then stop hosts, answer what is left, close sockets."""
        doorbell = self.ctx.socket(zmq.PULL)
        doorbell.bind(DOORBELL)
        self._outbox = self.ctx.socket(zmq.PUSH)
        self._outbox.setsockopt(zmq.SNDHWM, 0)
        self._outbox.connect(OUTBOX)
        self._devices = DeviceManager(self.ctx, self.config.run_dir, self.config.log_dir,
                                     self.config.heartbeat_timeout, self.config.start_timeout)
        poller = zmq.Poller()
        poller.register(doorbell, zmq.POLLIN)
        poller.register(self.devices.socket, zmq.POLLIN)
        wake_at: float | None = None
        checked_at = 0.0
        try:
            self._start_devices()
            if self.config.restore:
                self.models.restore()
            self.training.resume_journalled()
            while not self.stop_requested.is_set():
                timeout = IDLE_POLL if self._kernel_task is None else 0.01
                if wake_at is not None:
                    timeout = max(0.0, min(timeout, wake_at - time.monotonic()))
                ready = dict(poller.poll(int(timeout * 1000) + (1 if timeout > 0 else 0)))
                if doorbell in ready:
                    while doorbell.poll(0):
                        doorbell.recv(copy=False)
                self.rung = False  # before the drain: see KernelServer._ring
                self._drain_inbox()
                now = time.monotonic()
                events = self.devices.receive()
                if now >= checked_at + HEALTH_CHECK_INTERVAL:
                    events += self.devices.check(now)
                    checked_at = now
                for event in events:
                    self._on_host_event(event)
                self._expire(now)
                self._collect_kernel_task()
                wake_at = self._dispatch(now)
        except Exception:
            log.exception("scheduling loop crashed")
            raise
        finally:
            self._close(doorbell)

    def _close(self, doorbell: zmq.Socket) -> None:
        for job in list(self.active.values()):
            self.fail(job, JobState.CANCELLED, ErrorCode.CANCELLED, "the kernel is shutting down")
        if self._devices is not None:
            self._devices.stop_all()
        self._executor.shutdown(wait=False, cancel_futures=True)
        assert self._outbox is not None
        self._outbox.send_multipart([b""])  # tells the IO thread nothing more is coming
        self._outbox.close(linger=2000)
        doorbell.close()
        self.feedback.close()

    def _start_devices(self) -> None:
        wanted = self.config.devices or tuple(
            f"{name}:{device}" for name, spec in self.ext.drivers.items() for device in spec.probe()
        )
        for slot in wanted:
            driver, _, device = slot.partition(":")
            spec = self.ext.drivers.get(driver)
            self.devices.add(spec, device or "cpu", self.config.threads,
                             streams=self.config.streams)

    # --- requests ---------------------------------------------------------------------

    def _drain_inbox(self) -> None:
        while self.gone:
            identity = self.gone.popleft()
            for job in [j for j in self.active.values() if j.kind.client_gone(j, identity)]:
                self.fail(job, JobState.CANCELLED, ErrorCode.CANCELLED, "the client went away")
        while self.inbox:
            request = self.inbox.popleft()
            outcome = self._handle(request)
            if request.spec.name in PRIVILEGED and outcome is not None:
                self.audit.record(request.owner, request.spec.name, request.args, outcome)

    def _handle(self, request: Request) -> str | None:
        """Run the handler and answer; returns the outcome for the audit log, or None when
        a job was created (the job's end is audited instead)."""
        try:
            result = self._handlers[request.spec.name](request)
        except KernelError as exc:
            self.counters.rejected += 1
            self.send(request.identity, encode_error(
                request.msg.msg_id, request.spec.name, exc.code, exc.message))
            return str(exc.code)
        except Exception as exc:
            log.exception("syscall %s failed", request.spec.name)
            self.send(request.identity, encode_error(
                request.msg.msg_id, request.spec.name, ErrorCode.INTERNAL,
                f"{type(exc).__name__}: {exc}"))
            return str(ErrorCode.INTERNAL)
        if isinstance(result, Job):
            if request.msg.events:
                self.send(request.identity, encode_event(
                    request.msg.msg_id, request.spec.name, "accepted",
                    {"job": result.id, "state": str(result.state)}))
            return None
        body, buffers = result if isinstance(result, tuple) else (result, [])
        self.send(request.identity,
                  encode_reply(request.msg.msg_id, request.spec.name, body, buffers))
        return "ok"

    def send(self, identity: bytes, frames: list[bytes]) -> None:
        assert self._outbox is not None
        self._outbox.send_multipart([identity, *frames], copy=False)

    def admit(self, request: Request, device: str | None = None, **extra: Any) -> Job:
        owner = request.owner
        if len(self.active) >= self.config.max_jobs:
            raise KernelError(ErrorCode.BUSY,
                              f"the kernel has {len(self.active)} unfinished jobs "
                              f"(limit {self.config.max_jobs}); retry later")
        if self.per_owner[owner] >= self.config.max_jobs_per_client:
            raise KernelError(ErrorCode.BUSY,
                              f"client {owner!r} has {self.per_owner[owner]} unfinished jobs "
                              f"(limit {self.config.max_jobs_per_client}); wait for replies")
        held = self.bytes_per_owner[owner]
        if held and held + request.size > self.config.max_bytes_per_client:
            raise KernelError(ErrorCode.BUSY,
                              f"client {owner!r} has {held} bytes of requests in unfinished jobs "
                              f"(limit {self.config.max_bytes_per_client}); wait for replies")
        total = self.bytes_per_owner.total()
        if total and total + request.size > self.config.max_bytes:
            raise KernelError(ErrorCode.BUSY,
                              f"the kernel holds {total} bytes of requests in unfinished jobs "
                              f"(limit {self.config.max_bytes}); retry later")
        args = {**request.args, **extra}
        if device is not None:
            args["device"] = device
        job = Job(request.spec.name, owner, args, priority=args.get("priority") or 0,
                  kind=self._kind_of[request.spec.name])
        if args.get("timeout"):
            job.deadline = time.monotonic() + args["timeout"]
            heapq.heappush(self._deadlines, (job.deadline, job.id))
        job.reply_route = (request.identity, request.msg.msg_id)
        job.wants_events = request.msg.events
        job.request_bytes = request.size
        self.adopt(job)
        return job

    def adopt(self, job: Job) -> None:
        """Make ``job`` active and queue it (an admitted job, or one resumed from the
        journal)."""
        self.active[job.id] = job
        self.per_owner[job.owner] += 1
        self.bytes_per_owner[job.owner] += job.request_bytes
        self.scheduler.push(job)

    # --- scheduling ---------------------------------------------------------------------

    def _dispatch(self, now: float) -> float | None:
        if not self.scheduler.queue:
            return None
        batches, wake_at = self.scheduler.schedule(
            _devices(self.hosts(), kernel_free=self._kernel_task is None), now)
        for batch in batches:
            for job in batch.jobs:
                job.transition(JobState.RUNNING)
                job.attempts += 1
                job.device = batch.device
            kind = batch.jobs[0].kind
            if batch.device == KERNEL_DEVICE:
                work: Callable[[], dict[str, Any]] = kind.kernel_work(batch.jobs[0])
                self._kernel_task = (self._executor.submit(work), batch.jobs[0])
            else:
                host = self.hosts()[batch.device]
                self.devices.submit(host, kind.task(batch, host))
        return wake_at

    # --- results ----------------------------------------------------------------------

    def _on_host_event(self, event: HostEvent) -> None:
        """Apply one host event; a malformed result fails its jobs, never the loop."""
        try:
            self._apply_host_event(event)
        except Exception as exc:
            log.exception("bad %s event from %s", event.kind, event.host.name)
            for job in event.task.jobs if event.task else []:
                if job.state is JobState.RUNNING:
                    self.fail(job, JobState.FAILED, ErrorCode.INTERNAL,
                              f"{event.host.name} sent an unusable result: {exc}")

    def _apply_host_event(self, event: HostEvent) -> None:
        host = event.host
        if event.kind == "ready":
            for handle, payload in host.wanted.items():
                self.devices.submit(host, Task(TaskOp.LOAD, {"handle": handle, **payload}))
        elif event.kind in ("died", "stalled"):
            self._on_tasks_lost(host, event.kind, event.body["reason"], event.lost)
        elif event.kind == "stream":
            self.generation.on_stream(host.name, event.body["events"])
        elif event.task is not None:
            self._on_task_done(host, event.task, event.body, event.buffers)

    def _on_tasks_lost(self, host: DeviceHost, how: str, reason: str, lost: list[Task]) -> None:
        """Requeue the jobs of tasks a host lost (it ``died``), or of those a ``stalled``
        host offers when another host can run them (else they wait for it to wake or die;
        a stall is not a failed attempt); a job on its second attempt, or on a host given up
        for good, fails instead. A generation resumes after what it has streamed
        (kernel/generation.py)."""
        for task in lost:
            if how == "stalled":
                if not self._runs_elsewhere(task, host):
                    continue
                self.devices.take_back(host, task)
                for job in task.jobs:
                    job.attempts -= 1
            self.scheduler.finished(task.jobs, time.monotonic())
            for job in task.jobs:
                if job.state not in (JobState.RUNNING, JobState.PREEMPTED):
                    continue
                if job.state is JobState.PREEMPTED:
                    job.transition(JobState.RUNNING)
                if job.attempts >= 2 or host.state is HostState.FAILED:
                    self.fail(job, JobState.FAILED, ErrorCode.DEVICE_FAILED,
                              f"{host.name} {how} while running this job ({reason}); "
                              f"attempts: {job.attempts}")
                    continue
                job.kind.on_lost(job, stalled=how == "stalled")
                job.transition(JobState.QUEUED)
                job.device = None
                self.scheduler.push(job)
        if host.state is HostState.FAILED:
            host.wanted.clear()
            self.fail_orphans()

    def _runs_elsewhere(self, task: Task, stalled: DeviceHost) -> bool:
        """Whether a ready host other than ``stalled`` has ``task``'s model loaded."""
        handle = task.payload.get("handle")
        return any(h is not stalled and h.state is HostState.READY and handle in h.loaded
                   for h in self.hosts().values())

    def _on_task_done(self, host: DeviceHost, task: Task, body: dict[str, Any],
                      buffers: list[bytes]) -> None:
        self.scheduler.finished(task.jobs, time.monotonic())
        live = [job for job in task.jobs if job.state is JobState.RUNNING]
        _account(body, live)
        if not body.get("ok"):
            for job in live:
                self.fail(job, JobState.FAILED, body.get("code", ErrorCode.INTERNAL),
                          str(body.get("message", "driver error")))
            if task.op == TaskOp.LOAD:
                host.wanted.pop(task.payload.get("handle", ""), None)
                self.models.remember(host, task.payload.get("handle", ""))
                self.fail_orphans()
            return
        if task.op in (TaskOp.LOAD, TaskOp.UNLOAD):  # also the reloads of a restarted host
            self.models.placed(host, task.op, task.payload, body.get("info", {}))
        if task.jobs:
            task.jobs[0].kind.on_done(host, task, body, buffers, live)

    def finish(self, job: Job, result: dict[str, Any], buffers: list[bytes] | None = None) -> None:
        self._end(job, JobState.DONE)
        if job.reply_route:
            identity, msg_id = job.reply_route
            job.reply_route = None
            self.send(identity, encode_reply(msg_id, job.syscall, {"job": job.id, **result},
                                             buffers))

    def fail(self, job: Job, state: JobState, code: ErrorCode | str, message: str) -> None:
        job.error = f"{code}: {message}"
        self._end(job, state)
        if job.reply_route:
            identity, msg_id = job.reply_route
            job.reply_route = None
            self.send(identity, encode_error(msg_id, job.syscall, code, message))

    def _end(self, job: Job, state: JobState) -> None:
        if job.state is JobState.QUEUED:
            self.scheduler.remove(job.id)
        job.transition(state)
        del self.active[job.id]
        self.per_owner[job.owner] -= 1
        if self.per_owner[job.owner] <= 0:
            del self.per_owner[job.owner]
        self.bytes_per_owner[job.owner] -= job.request_bytes
        if self.bytes_per_owner[job.owner] <= 0:
            del self.bytes_per_owner[job.owner]
        self.history.append(job)
        self.finished_by_state[str(state)] += 1
        if job.syscall in PRIVILEGED:
            self.audit.record(job.owner, job.syscall, job.args, str(state))
        job.kind.on_end(job, state)
        self.swap.retire()
        try:
            self.pm.hook.llmos_job_finished(job=job)
        except Exception:
            log.exception("a llmos_job_finished hook failed")

    def fail_orphans(self) -> None:
        for job in list(self.scheduler.queue.values()):
            if (error := job.kind.orphaned(job)) is not None:
                self.fail(job, JobState.FAILED, error.code, error.message)

    def _expire(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, job_id = heapq.heappop(self._deadlines)
            job = self.active.get(job_id)
            if job is not None:
                self.fail(job, JobState.TIMED_OUT, ErrorCode.TIMEOUT,
                          f"job {job.id} passed its deadline of {job.args['timeout']} s")

    def _collect_kernel_task(self) -> None:
        if self._kernel_task is None or not self._kernel_task[0].done():
            return
        future, job = self._kernel_task
        self._kernel_task = None
        if job.state is not JobState.RUNNING:
            return
        try:
            self.finish(job, future.result())
        except KernelError as exc:
            self.fail(job, JobState.FAILED, exc.code, exc.message)
        except Exception as exc:
            log.exception("%s failed", job.syscall)
            self.fail(job, JobState.FAILED, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")


def _account(body: dict[str, Any], jobs: list[Job]) -> None:
    """Charge a task's CPU time and tokens to its jobs in proportion to their inputs."""
    sizes = [len(job.args.get("inputs") or [None]) for job in jobs]
    total = sum(sizes) or 1
    for job, size in zip(jobs, sizes, strict=True):
        job.cpu_seconds += float(body.get("cpu_seconds", 0.0)) * size / total
        job.tokens += int(body.get("tokens", 0)) * size // total
        job.peak_memory = max(job.peak_memory, int(body.get("rss", 0)))


def _devices(hosts: dict[str, DeviceHost], kernel_free: bool) -> Devices:
    """The devices as the scheduler sees them now: how many more batches each takes (the
    kernel pseudo-device one when ``kernel_free``), the hardware busy with foreground work
    (mapped to the host running it: its other streams may join), what each runs on, and
    the inputs in flight on each, then the tasks it was ever sent (round robin among
    equals).

    Session quanta and generation run in the background (hostwire.BACKGROUND_TASK_OPS):
    they neither wait for nor block their hardware, so inference keeps flowing to the
    other hosts on it.
    """
    busy = {host.hardware: host.name for host in hosts.values() if host.state is HostState.READY
            and any(task.op not in BACKGROUND_TASK_OPS for task in host.inflight.values())}
    free = {host.name: slots for host in hosts.values() if (slots := host.free_slots)}
    if kernel_free:
        free[KERNEL_DEVICE] = 1
    hardware = {name: host.hardware for name, host in hosts.items()}
    load = {name: (float(sum(len(task.payload.get("inputs") or [None])
                             for task in host.inflight.values())), float(host.submitted))
            for name, host in hosts.items()}
    return Devices(free, busy, hardware, load)
