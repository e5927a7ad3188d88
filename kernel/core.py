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
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pluggy
import zmq

from llmos.contract.hostwire import BACKGROUND_TASK_OPS
from llmos.contract.protocol import (
    ErrorCode,
    KernelError,
    Message,
    encode_error,
    encode_event,
    encode_reply,
    new_id,
    tensor_from_ref,
    tensor_ref,
)
from llmos.contract.syscalls import SYSCALLS, Syscall, check_inputs

from .compression import CompressionSyscalls
from .config import KernelConfig
from .control import ControlSyscalls
from .devices import DeviceHost, DeviceManager, HostEvent, HostState, Task, hardware_of
from .feedback import FeedbackStore
from .generation import GenerationSyscalls, Streamed
from .jobs import Job, JobHistory, JobState
from .learning import LearningSyscalls
from .models import ModelSyscalls
from .monitor import ModelMonitor
from .parallel import ParallelPlacement
from .placement import CostModel
from .plugins import Extensions
from .registry import ModelVersion, Registry
from .scheduler import Batch, Scheduler
from .security import LOCAL_PRINCIPAL, PRIVILEGED, AuditLog, Principal
from .training import TrainingSyscalls
from .updates import UpdateSyscalls

log = logging.getLogger(__name__)

#: The pseudo-device that runs registry work (imports) on a kernel thread.
KERNEL_DEVICE = "kernel"
#: Longest a loop pass sleeps when nothing is due, in seconds.
IDLE_POLL = 0.05
#: Seconds between two checks that the driver hosts live (a busy loop passes far more often).
HEALTH_CHECK_INTERVAL = 0.05

#: Jobs that run in the background of their hardware (see Scheduler.background).
BACKGROUND_SYSCALLS = frozenset({"train", "generate", "compress", "update"})

DOORBELL = "inproc://llmos-doorbell"
OUTBOX = "inproc://llmos-outbox"


@dataclass(slots=True)
class Request:
    """A decoded, validated request handed from the IO thread to the core."""

    identity: bytes
    msg: Message
    spec: Syscall
    args: dict[str, Any]
    principal: Principal = LOCAL_PRINCIPAL
    #: Bytes of the message (all frames but the identity); 0 for the kernel's own.
    size: int = 0

    @property
    def owner(self) -> str:
        """The key name when authenticated; else the client's own name (local trust)."""
        if self.principal.authenticated:
            return self.principal.name
        return self.msg.client or self.identity.hex()


@dataclass(slots=True)
class Counters:
    """Traffic counters shared by the IO thread (writer) and ``stats`` (reader)."""

    received: int = 0
    rejected: int = 0
    replies: int = 0
    dropped_replies: int = 0


class KernelCore(ControlSyscalls, ModelSyscalls, TrainingSyscalls, GenerationSyscalls,
                 LearningSyscalls, UpdateSyscalls, CompressionSyscalls, ParallelPlacement):
    """All job state, the scheduler and the device manager; driven by :meth:`run`."""

    def __init__(self, config: KernelConfig, pm: pluggy.PluginManager, ext: Extensions,
                 registry: Registry, ctx: zmq.Context, counters: Counters,
                 inbox: deque[Request], audit: AuditLog) -> None:
        self.config, self.pm, self.ext, self.registry = config, pm, ext, registry
        self.feedback = FeedbackStore(config.home)
        self.monitors: dict[str, ModelMonitor] = {}
        self.ctx, self.counters, self.inbox, self.audit = ctx, counters, inbox, audit
        self.started = time.time()
        self.stop_requested = threading.Event()
        self.active: dict[int, Job] = {}
        self.history = JobHistory(config.history)
        self.per_owner: Counter[str] = Counter()
        #: Bytes of requests held by unfinished jobs, per owner (see _admit).
        self.bytes_per_owner: Counter[str] = Counter()
        self.streamed: dict[int, Streamed] = {}
        self.stream_jobs: dict[int, int] = {}
        #: Peers the IO thread could not reach (disconnected); their streams are cancelled.
        self.gone: deque[bytes] = deque()
        #: True while the IO thread has rung the doorbell and the core has not yet drained.
        self.rung = False
        self.finished_by_state: Counter[str] = Counter()
        self._deadlines: list[tuple[float, int]] = []
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="llmos-kernel-task")
        self._kernel_task: tuple[Future[dict[str, Any]], Job] | None = None
        self.costs = CostModel()
        self.batching = config.batching
        self.memory_budget = config.memory_budget
        policy = ext.policies.get(config.policy)()
        self.scheduler = Scheduler(policy, self._batch_key, self._candidates, self._batching,
                                   cost=self._cost, hardware=self._hardware,
                                   background=lambda job: job.syscall in BACKGROUND_SYSCALLS,
                                   load=self._outstanding)
        self._retiring: set[str] = set()
        self.devices: DeviceManager | None = None
        self._outbox: zmq.Socket | None = None
        self._handlers: dict[str, Callable[[Request], Any]] = {
            "drivers": self._drivers, "devices": self._devices, "models": self._models,
            "import": self._import, "export": self._export, "load": self._load,
            "unload": self._unload, "datasets": self._datasets, "train": self._train,
            "evaluate": self._evaluate, "infer": self._infer, "generate": self._generate,
            "learn": self._learn, "update": self._update, "rollback": self._rollback,
            "compress": self._compress, "promote": self._promote,
            "jobs": self._jobs, "job": self._job, "cancel": self._cancel,
            "renice": self._renice, "stats": self._stats, "shutdown": self._shutdown,
        }

    # --- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        """Serve until ``shutdown``; then stop hosts, answer what is left, close sockets."""
        doorbell = self.ctx.socket(zmq.PULL)
        doorbell.bind(DOORBELL)
        self._outbox = self.ctx.socket(zmq.PUSH)
        self._outbox.setsockopt(zmq.SNDHWM, 0)
        self._outbox.connect(OUTBOX)
        self.devices = DeviceManager(self.ctx, self.config.run_dir, self.config.log_dir,
                                     self.config.heartbeat_timeout, self.config.start_timeout)
        poller = zmq.Poller()
        poller.register(doorbell, zmq.POLLIN)
        poller.register(self.devices.socket, zmq.POLLIN)
        wake_at: float | None = None
        checked_at = 0.0
        try:
            self._start_devices()
            self._resume_journalled()
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
            self._fail(job, JobState.CANCELLED, ErrorCode.CANCELLED, "the kernel is shutting down")
        if self.devices is not None:
            self.devices.stop_all()
        self._executor.shutdown(wait=False, cancel_futures=True)
        assert self._outbox is not None
        self._outbox.send_multipart([b""])  # tells the IO thread nothing more is coming
        self._outbox.close(linger=2000)
        doorbell.close()
        self.feedback.close()

    def _start_devices(self) -> None:
        assert self.devices is not None
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
            for job in [j for j in self.active.values() if j.syscall == "generate"
                        and j.reply_route and j.reply_route[0] == identity]:
                self._fail(job, JobState.CANCELLED, ErrorCode.CANCELLED, "the client went away")
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
            self._send(request.identity, encode_error(
                request.msg.msg_id, request.spec.name, exc.code, exc.message))
            return str(exc.code)
        except Exception as exc:
            log.exception("syscall %s failed", request.spec.name)
            self._send(request.identity, encode_error(
                request.msg.msg_id, request.spec.name, ErrorCode.INTERNAL,
                f"{type(exc).__name__}: {exc}"))
            return str(ErrorCode.INTERNAL)
        if isinstance(result, Job):
            if request.msg.events:
                self._send(request.identity, encode_event(
                    request.msg.msg_id, request.spec.name, "accepted",
                    {"job": result.id, "state": str(result.state)}))
            return None
        body, buffers = result if isinstance(result, tuple) else (result, [])
        self._send(request.identity,
                   encode_reply(request.msg.msg_id, request.spec.name, body, buffers))
        return "ok"

    def _internal_request(self, name: str, owner: str, body: dict[str, Any]) -> Request:
        """A request the kernel makes itself on behalf of ``owner`` (e.g. the promotion
        that follows a passing update); set the job's ``reply_route`` to None."""
        spec = SYSCALLS[name]
        args = spec.parse(body)
        return Request(b"", Message(name, args, new_id(), client=owner), spec, args)

    def _send(self, identity: bytes, frames: list[bytes]) -> None:
        assert self._outbox is not None
        self._outbox.send_multipart([identity, *frames], copy=False)

    def _admit(self, request: Request, device: str | None = None, **extra: Any) -> Job:
        """Create and queue a job, or KernelError(BUSY) past a queue limit."""
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
        job = Job(request.spec.name, owner, args, priority=args.get("priority") or 0)
        if args.get("timeout"):
            job.deadline = time.monotonic() + args["timeout"]
            heapq.heappush(self._deadlines, (job.deadline, job.id))
        job.reply_route = (request.identity, request.msg.msg_id)
        job.wants_events = request.msg.events
        job.request_bytes = request.size
        self.active[job.id] = job
        self.per_owner[owner] += 1
        self.bytes_per_owner[owner] += request.size
        self.scheduler.push(job)
        return job

    # --- scheduling hooks ---------------------------------------------------------------

    def _batch_key(self, job: Job) -> Hashable | None:
        if job.syscall == "infer":
            return (job.args["handle"], job.args["task"])
        return (job.args["handle"], "generate") if job.syscall == "generate" else None

    def _candidates(self, job: Job) -> list[str]:
        if job.syscall in ("import", "export"):
            return [KERNEL_DEVICE]
        if job.syscall in ("train", "evaluate", "compress", "update"):
            return self._training_candidates(job)
        if job.syscall in ("infer", "generate"):
            assert self.devices is not None
            handle = job.args["handle"]  # a pipeline's batches enter at its first stage
            return [h.name for h in self.devices.hosts.values()
                    if handle in h.loaded and h.role.get("stage", 1) == 1
                    and self._pipeline_loaded(h, handle)]
        return [job.args["targets"][0]]

    def _hardware(self, device: str) -> str:
        """What a device (a host name, or the kernel) runs on: the scheduler runs one
        foreground batch at a time per hardware."""
        host = self.devices.hosts.get(device) if self.devices is not None else None
        return host.hardware if host is not None else hardware_of(device)

    def _outstanding(self, device: str) -> tuple[float, ...]:
        """Inputs in flight on a host, then tasks ever sent (round robin among equals)."""
        host = self.devices.hosts.get(device) if self.devices is not None else None
        if host is None:
            return (0.0, 0.0)
        inflight = sum(len(task.payload.get("inputs") or [None]) for task in host.inflight.values())
        return (float(inflight), float(host.submitted))

    def _free_devices(self) -> tuple[dict[str, int], dict[str, str]]:
        """How many more batches each device takes now, and the hardware busy with
        foreground work (mapped to the host running it: its other streams may join).

        Training quanta and generation run in the background: they neither wait for nor
        block their hardware, so inference keeps flowing to the other hosts on it.
        """
        assert self.devices is not None
        hosts = self.devices.hosts.values()
        busy = {host.hardware: host.name for host in hosts if host.state is HostState.READY
                and any(task.op not in BACKGROUND_TASK_OPS for task in host.inflight.values())}
        free = {host.name: slots for host in hosts if (slots := host.free_slots)}
        if self._kernel_task is None:
            free[KERNEL_DEVICE] = 1
        return free, busy

    def _dispatch(self, now: float) -> float | None:
        free, busy = self._free_devices()
        batches, wake_at = self.scheduler.schedule(free, now, busy)
        for batch in batches:
            for job in batch.jobs:
                job.transition(JobState.RUNNING)
                job.attempts += 1
                job.device = batch.device
            if batch.device == KERNEL_DEVICE:
                self._start_kernel_task(batch.jobs[0])
            else:
                assert self.devices is not None
                self.devices.submit(self.devices.hosts[batch.device], self._task_for(batch))
        return wake_at

    def _task_for(self, batch: Batch) -> Task:
        first = batch.jobs[0]
        if first.syscall == "generate":
            return self._generation_task(batch.jobs)
        if first.syscall == "infer":
            inputs = [text for job in batch.jobs for text in job.args["inputs"]]
            return Task("run", {"handle": first.args["handle"], "kind": first.args["task"],
                                "inputs": inputs}, batch.jobs)
        assert self.devices is not None
        host = self.devices.hosts[batch.device]
        if first.syscall == "compress":
            return self._compress_task(first, host)
        if first.syscall == "update":
            return self._update_task(first, host)
        if first.syscall in ("train", "evaluate"):
            return self._training_task(first, host)
        op, payload = self._placement_payload(first, host)
        return Task(op, payload, batch.jobs)

    # --- results ----------------------------------------------------------------------

    def _on_host_event(self, event: HostEvent) -> None:
        """Apply one host event; a malformed result fails its jobs, never the loop."""
        try:
            self._apply_host_event(event)
        except Exception as exc:
            log.exception("bad %s event from %s", event.kind, event.host.name)
            for job in event.task.jobs if event.task else []:
                if job.state is JobState.RUNNING:
                    self._fail(job, JobState.FAILED, ErrorCode.INTERNAL,
                               f"{event.host.name} sent an unusable result: {exc}")

    def _apply_host_event(self, event: HostEvent) -> None:
        host = event.host
        if event.kind == "ready":
            assert self.devices is not None
            for handle, payload in host.wanted.items():
                self.devices.submit(host, Task("load", {"handle": handle, **payload}))
        elif event.kind in ("died", "stalled"):
            self._on_tasks_lost(host, event.kind, event.body["reason"], event.lost)
        elif event.kind == "stream":
            self._on_stream(host.name, event.body["events"])
        elif event.task is not None:
            self._on_task_done(host, event.task, event.body, event.buffers)

    def _on_tasks_lost(self, host: DeviceHost, how: str, reason: str, lost: list[Task]) -> None:
        """Requeue the jobs of tasks a host lost (it ``died``), or of those a ``stalled``
        host offers when another host can run them (else they wait for it to wake or die;
        a stall is not a failed attempt); a job on its second attempt, or on a host given up
        for good, fails instead. A generation resumes after what it has streamed
        (kernel/generation.py)."""
        assert self.devices is not None
        for task in lost:
            if how == "stalled":
                if not self._runs_elsewhere(task, host):
                    continue
                self.devices.take_back(host, task)
                for job in task.jobs:
                    job.attempts -= 1
            for job in task.jobs:
                if job.state not in (JobState.RUNNING, JobState.PREEMPTED):
                    continue
                if job.state is JobState.PREEMPTED:
                    job.transition(JobState.RUNNING)
                if job.attempts >= 2 or host.state is HostState.FAILED:
                    self._fail(job, JobState.FAILED, ErrorCode.DEVICE_FAILED,
                               f"{host.name} {how} while running this job ({reason}); "
                               f"attempts: {job.attempts}")
                    continue
                if how == "stalled" and job.syscall == "generate":
                    self._stop_generation(job)  # the host drops it when it wakes up
                job.transition(JobState.QUEUED)
                job.device = None
                self.scheduler.push(job)
        if host.state is HostState.FAILED:
            host.wanted.clear()
            self._fail_orphans()

    def _runs_elsewhere(self, task: Task, stalled: DeviceHost) -> bool:
        """Whether a ready host other than ``stalled`` has ``task``'s model loaded."""
        assert self.devices is not None
        handle = task.payload.get("handle")
        return any(h is not stalled and h.state is HostState.READY and handle in h.loaded
                   for h in self.devices.hosts.values())

    def _on_task_done(self, host: DeviceHost, task: Task, body: dict[str, Any],
                      buffers: list[bytes]) -> None:
        live = [job for job in task.jobs if job.state is JobState.RUNNING]
        self._account(task, body, live)
        handle = task.payload.get("handle", "")
        if not body.get("ok"):
            for job in live:
                self._fail(job, JobState.FAILED, body.get("code", ErrorCode.INTERNAL),
                           str(body.get("message", "driver error")))
            if task.op == "load":
                host.wanted.pop(handle, None)
                self._fail_orphans()
            return
        if task.op in ("load", "unload"):
            self._on_placed(host, task.op, task.payload, body.get("info", {}), live)
        elif task.op in ("train", "evaluate"):
            self._on_trained(host, task, body, live)
        elif task.op == "compress":
            self._on_compressed(task, body, live)
        elif task.op == "update":
            self._on_updated(task, body, live)
        elif task.op in ("run", "stage") and host.role.get("next"):
            self._forward_stage(host, task, body, buffers, live)
        elif task.op in ("run", "stage"):
            self._split_outputs(host, task, body, buffers, live)
        elif task.op == "generate":
            for job in live + [j for j in task.jobs if j.state is JobState.PREEMPTED]:
                self._fail(job, JobState.FAILED, ErrorCode.INTERNAL,
                           f"{host.name} ended the generation without a result")

    def _split_outputs(self, host: DeviceHost, task: Task, body: dict[str, Any],
                       buffers: list[bytes], live: list[Job]) -> None:
        arrays = {name: tensor_from_ref(ref, buffers) for name, ref in body["arrays"].items()}
        labels = host.loaded.get(task.payload["handle"], {}).get("labels", [])
        start = 0
        for job in task.jobs:
            count = len(job.args["inputs"])
            if job.state is JobState.RUNNING:
                out_buffers: list[bytes] = []
                result: dict[str, Any] = {"model": job.args["handle"], "task": job.args["task"],
                                          "tokens": job.tokens}
                for name, array in arrays.items():
                    result[name] = tensor_ref(array[start:start + count], out_buffers)
                if job.args["task"] == "classify":
                    probs = arrays["probs"][start:start + count]
                    result["labels"] = labels
                    result["predictions"] = [
                        {"label": labels[int(i)] if labels else str(int(i)),
                         "score": float(row[int(i)])}
                        for row, i in zip(probs, np.argmax(probs, axis=1), strict=True)]
                self._observe(job, [(p["label"], p["score"]) for p in result.get("predictions", [])])
                self._finish(job, result, out_buffers)
            start += count

    @staticmethod
    def _account(task: Task, body: dict[str, Any], jobs: list[Job]) -> None:
        """Charge a task's CPU time and tokens to its jobs in proportion to their inputs."""
        sizes = [len(job.args.get("inputs") or [None]) for job in jobs]
        total = sum(sizes) or 1
        for job, size in zip(jobs, sizes, strict=True):
            job.cpu_seconds += float(body.get("cpu_seconds", 0.0)) * size / total
            job.tokens += int(body.get("tokens", 0)) * size // total
            job.peak_memory = max(job.peak_memory, int(body.get("rss", 0)))

    def _finish(self, job: Job, result: dict[str, Any], buffers: list[bytes] | None = None) -> None:
        self._end(job, JobState.DONE)
        if job.reply_route:
            identity, msg_id = job.reply_route
            job.reply_route = None
            self._send(identity, encode_reply(msg_id, job.syscall, {"job": job.id, **result},
                                              buffers))

    def _fail(self, job: Job, state: JobState, code: ErrorCode | str, message: str) -> None:
        job.error = f"{code}: {message}"
        if job.syscall == "infer" and state is not JobState.CANCELLED and "handle" in job.args:
            self._monitor(job.args["handle"]).record_error()
        self._end(job, state)
        if job.reply_route:
            identity, msg_id = job.reply_route
            job.reply_route = None
            self._send(identity, encode_error(msg_id, job.syscall, code, message))

    def _end(self, job: Job, state: JobState) -> None:
        if job.state is JobState.QUEUED:
            self.scheduler.remove(job.id)
        elif job.syscall == "generate" and state is not JobState.DONE:
            self._stop_generation(job)
        if job.syscall == "generate":
            self._generation_ended(job)
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
        if job.syscall in ("train", "compress", "update"):
            if job.syscall == "train":
                self._journal(job, state)
            else:
                self._work_folder_ended(job, state)
            host = self._hosts().get(job.args.get("host", ""))
            if state is not JobState.DONE and host is not None and host.state is HostState.READY:
                assert self.devices is not None
                self.devices.submit(host, Task("forget", {"job": str(job.id)}))
        if self._retiring:
            self._retire()
        try:
            self.pm.hook.llmos_job_finished(job=job)
        except Exception:
            log.exception("a llmos_job_finished hook failed")

    def _fail_orphans(self) -> None:
        """Fail queued jobs that no device can ever run (model unloaded, device failed)."""
        assert self.devices is not None
        hosts = self.devices.hosts
        for job in list(self.scheduler.queue.values()):
            if job.syscall == "infer":
                handle = job.args["handle"]
                if not any(handle in h.wanted or handle in h.loaded for h in hosts.values()):
                    self._fail(job, JobState.FAILED, ErrorCode.NOT_FOUND,
                               f"{handle} is no longer loaded on any device")
            elif job.syscall in ("load", "unload"):
                host = hosts[job.args["targets"][0]]
                if host.state is HostState.FAILED:
                    self._fail(job, JobState.FAILED, ErrorCode.DEVICE_FAILED,
                               f"device {host.name} has failed: {host.last_error}")

    def _expire(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, job_id = heapq.heappop(self._deadlines)
            job = self.active.get(job_id)
            if job is not None:
                self._fail(job, JobState.TIMED_OUT, ErrorCode.TIMEOUT,
                           f"job {job.id} passed its deadline of {job.args['timeout']} s")

    # --- kernel-side work (imports, exports) ------------------------------------------

    def _collect_kernel_task(self) -> None:
        if self._kernel_task is None or not self._kernel_task[0].done():
            return
        future, job = self._kernel_task
        self._kernel_task = None
        if job.state is not JobState.RUNNING:
            return
        try:
            self._finish(job, future.result())
        except KernelError as exc:
            self._fail(job, JobState.FAILED, exc.code, exc.message)
        except Exception as exc:
            log.exception("%s failed", job.syscall)
            self._fail(job, JobState.FAILED, ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")

    # --- syscall handlers ---------------------------------------------------------------

    def _infer(self, request: Request) -> Job:
        check_inputs(request.args["inputs"])
        version = self._loaded_version(request, request.args["task"],
                                       "classify needs a model with a classification head")
        return self._admit(request, handle=version.ref)

    def _loaded_version(self, request: Request, task: str, hint: str) -> ModelVersion:
        """The version a request names, loaded (or loading) somewhere and able to do
        ``task``; KernelError NOT_FOUND or BAD_REQUEST (with ``hint``) otherwise."""
        version = self.registry.resolve(request.args["model"], request.args["version"])
        assert self.devices is not None
        hosts = [h for h in self.devices.hosts.values()
                 if version.ref in h.wanted or version.ref in h.loaded]
        if not hosts:
            raise KernelError(ErrorCode.NOT_FOUND,
                              f"{version.ref} is not loaded (run: llmos load {version.model})")
        info = next((h.loaded[version.ref] for h in hosts if version.ref in h.loaded), None)
        if info is not None and task not in info["tasks"]:
            raise KernelError(ErrorCode.BAD_REQUEST,
                              f"{version.ref} cannot {task} (it can: {', '.join(info['tasks'])}); "
                              f"{hint}")
        return version
