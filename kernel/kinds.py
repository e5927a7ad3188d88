"""Job kinds: what the scheduling loop asks of each kind of work, and what it offers them.

:class:`~llmos.kernel.core.KernelCore` is the loop only: admit, schedule, dispatch, collect,
end. Everything that depends on what a job *is* lives in a :class:`JobKind` (inference,
generation, model operations, training, compression, update, version swap, control), one
module each. A request's kind is decided once, when it is admitted (``Job.kind``); after
that the loop never looks at a syscall name: it asks the job's kind for the batch key, the
candidate devices, the host task, and what a result or an end means.

A kind sees the core only through :class:`Core`, the explicit interface below; kinds that
need each other (an update promotes through the version swap) are given each other when
the core builds them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from llmos.contract.protocol import ErrorCode, KernelError, Message, new_id
from llmos.contract.syscalls import SYSCALLS, Syscall

from .security import LOCAL_PRINCIPAL, Principal

if TYPE_CHECKING:
    import threading
    from collections import Counter

    import pluggy

    from .config import KernelConfig
    from .devices import DeviceHost, DeviceManager, Task
    from .jobs import Job, JobHistory, JobState
    from .placement import CostModel
    from .plugins import Extensions
    from .registry import ModelVersion, Registry
    from .scheduler import Batch, BatchingConfig, Scheduler
    from .security import AuditLog

#: A syscall handler: a reply body (with tensor buffers), or the job it admitted.
Handler = Callable[["Request"], Any]
#: The pseudo-device that runs registry work (imports, exports) on a kernel thread.
KERNEL_DEVICE = "kernel"


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


def internal_request(name: str, owner: str, body: dict[str, Any]) -> Request:
    """A request the kernel makes itself on behalf of ``owner`` (e.g. the promotion that
    follows a passing update); the job it admits should get ``reply_route = None``."""
    spec = SYSCALLS[name]
    args = spec.parse(body)
    return Request(b"", Message(name, args, new_id(), client=owner), spec, args)


@dataclass(slots=True)
class Counters:
    """Traffic counters shared by the IO thread (writer) and ``stats`` (reader)."""

    received: int = 0
    rejected: int = 0
    replies: int = 0
    dropped_replies: int = 0


class Core(Protocol):
    """What the scheduling loop offers the job kinds (implemented by KernelCore)."""

    config: KernelConfig
    pm: pluggy.PluginManager
    ext: Extensions
    registry: Registry
    scheduler: Scheduler
    costs: CostModel
    #: Kernel-wide batching defaults (a driver's own knobs win).
    batching: BatchingConfig
    #: Unfinished jobs by id.
    active: dict[int, Job]
    history: JobHistory
    per_owner: Counter[str]
    finished_by_state: Counter[str]
    counters: Counters
    audit: AuditLog
    started: float
    stop_requested: threading.Event

    @property
    def devices(self) -> DeviceManager:
        """The driver hosts' manager (exists once the loop runs)."""
        ...

    def hosts(self) -> dict[str, DeviceHost]:
        """The driver hosts by name."""
        ...

    def admit(self, request: Request, device: str | None = None, **extra: Any) -> Job:
        """Create and queue a job of the request's kind, its args extended by ``extra``;
        KernelError(BUSY) past a queue or byte limit."""
        ...

    def adopt(self, job: Job) -> None:
        """Make a job active and queue it (one resumed from the journal)."""
        ...

    def finish(self, job: Job, result: dict[str, Any], buffers: list[bytes] | None = None) -> None:
        """End a job DONE and reply with ``result`` (and tensor buffers)."""
        ...

    def fail(self, job: Job, state: JobState, code: ErrorCode | str, message: str) -> None:
        """End a job in ``state`` with an error reply."""
        ...

    def send(self, identity: bytes, frames: list[bytes]) -> None:
        """Queue frames for a client on the IO thread's outbox."""
        ...

    def fail_orphans(self) -> None:
        """Fail queued jobs that no device can ever run."""
        ...


class JobKind:
    """One kind of work: its syscall handlers and, for the syscalls that admit jobs, what
    scheduling and results mean for them. The defaults suit a kind whose handlers answer at
    once (no jobs)."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def handlers(self) -> dict[str, Handler]:
        """The syscalls this kind answers, by name."""
        return {}

    def background(self, job: Job) -> bool:
        """Whether the job runs in the background of its hardware (see Scheduler)."""
        return False

    def batch_key(self, job: Job) -> Hashable | None:
        """A key shared by jobs that may run in one batch; None: the job runs alone."""
        return None

    def candidates(self, job: Job) -> list[str]:
        """The devices that can run the job now."""
        raise NotImplementedError(f"{type(self).__name__} admits no jobs")

    def batching(self, job: Job) -> BatchingConfig:
        """The batching knobs for the job."""
        return self.core.batching

    def cost(self, jobs: list[Job], device: str) -> float:
        """Predicted milliseconds of the hardware a batch takes on a device."""
        return 0.0

    def task(self, batch: Batch, host: DeviceHost) -> Task:
        """The host task that runs a batch on ``host``."""
        raise NotImplementedError(f"{type(self).__name__} runs no host tasks")

    def kernel_work(self, job: Job) -> Callable[[], dict[str, Any]]:
        """The work a job does on the kernel pseudo-device (a kernel thread)."""
        raise NotImplementedError(f"{type(self).__name__} runs no kernel work")

    def on_done(self, host: DeviceHost, task: Task, body: dict[str, Any],
                buffers: list[bytes], live: list[Job]) -> None:
        """A task of this kind succeeded; ``live`` are its jobs still running."""

    def on_lost(self, job: Job, stalled: bool) -> None:
        """The job's host died or stalled, and the job goes back to the queue."""

    def on_renice(self, job: Job) -> None:
        """The job's priority changed (``job.priority``) while it is unfinished."""

    def orphaned(self, job: Job) -> KernelError | None:
        """Why a queued job can never run (its model unloaded, its device failed), or None."""
        return None

    def on_end(self, job: Job, state: JobState) -> None:
        """The job ended (it is out of the active set and in the history)."""

    def client_gone(self, job: Job, identity: bytes) -> bool:
        """Whether the job must be cancelled because the client ``identity`` went away."""
        return False


def loaded_version(core: Core, request: Request, task: str, hint: str) -> ModelVersion:
    """The version a request names, loaded (or loading) somewhere and able to do ``task``;
    KernelError NOT_FOUND, or BAD_REQUEST with ``hint``, otherwise."""
    version = core.registry.resolve(request.args["model"], request.args["version"])
    hosts = [h for h in core.hosts().values() if version.ref in h.wanted or version.ref in h.loaded]
    if not hosts:
        raise KernelError(ErrorCode.NOT_FOUND,
                          f"{version.ref} is not loaded (run: llmos load {version.model})")
    info = next((h.loaded[version.ref] for h in hosts if version.ref in h.loaded), None)
    if info is not None and task not in info["tasks"]:
        raise KernelError(ErrorCode.BAD_REQUEST,
                          f"{version.ref} cannot {task} (it can: {', '.join(info['tasks'])}); {hint}")
    return version

