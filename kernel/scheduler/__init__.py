"""The scheduler: ranks queued jobs with a policy plugin and forms batches for free devices.

Called once per pass of the kernel's scheduling loop; it never touches sockets. The policy
decides order; this module decides grouping (dynamic batching of compatible ``infer`` jobs,
Triton's max batch size and max queue delay, fixed or picked from the observed load by
:mod:`.adaptive`) and placement onto free devices.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..jobs import Job
from .adaptive import AdaptiveBatching


class Policy(Protocol):
    """A scheduling policy: queued jobs run in ascending ``rank`` order."""

    name: str

    def rank(self, job: Job, now: float) -> tuple[float, ...]: ...


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    """Dynamic batching knobs for one model (the Triton names)."""

    #: Most inputs (texts) in one batch.
    max_batch_size: int = 32
    #: How long the oldest job may wait for more jobs to fill a batch, in seconds.
    max_queue_delay: float = 0.002
    #: Pick the batch size (at most ``max_batch_size``) and the queue delay (from the
    #: first timed batch on) from the observed load: see :mod:`.adaptive`.
    adaptive: bool = False


@dataclass(slots=True)
class Batch:
    """Jobs that run together on one device."""

    device: str
    jobs: list[Job]
    key: Hashable

    @property
    def size(self) -> int:
        return sum(_inputs(job) for job in self.jobs)


class JobQuestions(Protocol):
    """What the scheduler asks of a queued job's kind (``Job.kind``; kernel/kinds.py)."""

    def batch_key(self, job: Job) -> Hashable | None:
        """A key shared by jobs that may run in one batch; None: the job runs alone."""
        ...

    def candidates(self, job: Job) -> list[str]:
        """The devices that can run the job now (e.g. where its model is loaded)."""
        ...

    def batching(self, job: Job) -> BatchingConfig:
        """The batching knobs for the job's model."""
        ...

    def cost(self, jobs: list[Job], device: str) -> float:
        """Predicted run time of a batch on a device (the cheapest free one is chosen)."""
        ...

    def background(self, job: Job) -> bool:
        """Whether the job runs in the background of its hardware (training, generation):
        it may start while the hardware is busy, and does not make it busy."""
        ...


@dataclass(slots=True)
class Devices:
    """The devices as the kernel sees them at one pass of its loop: plain data."""

    #: How many more batches each device that can take work takes now.
    free: dict[str, int]
    #: Hardware running foreground work -> the device running it (its other streams may
    #: join; ``""``: held by nobody who may add to it).
    busy: dict[str, str] = field(default_factory=dict)
    #: What each device runs on (absent: the device is its own hardware). One device's
    #: foreground work at a time per hardware.
    hardware: dict[str, str] = field(default_factory=dict)
    #: Ties between equally cheap devices (identical replicas) go to the least loaded.
    load: dict[str, tuple[float, ...]] = field(default_factory=dict)


@dataclass(slots=True)
class Scheduler:
    """Holds the run queue and decides, from plain data about the devices and what each
    job's kind answers (:class:`JobQuestions`), which batches run where; it never calls
    back into the kernel. For adaptive batching, the kernel reports each dispatched
    batch's end with :meth:`finished`.
    """

    policy: Policy
    queue: dict[int, Job] = field(default_factory=dict)
    adaptive: AdaptiveBatching = field(default_factory=AdaptiveBatching)

    def push(self, job: Job) -> None:
        """Queue a job (again, after a requeue), as of its ``queued_at``."""
        self.queue[job.id] = job
        key = _kind(job).batch_key(job)
        if key is not None:
            self.adaptive.queued(job.id, key, _inputs(job), job.queued_at)

    def remove(self, job_id: int) -> Job | None:
        self.adaptive.dropped(job_id)
        return self.queue.pop(job_id, None)

    def finished(self, jobs: list[Job], now: float) -> None:
        """The batch of ``jobs`` (a dispatched batch's, in order) is done, whatever its
        outcome: adaptive batching times it and stops counting its jobs as outstanding."""
        self.adaptive.finished([job.id for job in jobs], now)

    def __len__(self) -> int:
        return len(self.queue)

    def schedule(self, devices: Devices, now: float) -> tuple[list[Batch], float | None]:
        """Batches to dispatch now, and the time at which a waiting batch becomes ready.

        A free device takes the highest-ranked job it can run, plus compatible jobs in
        rank order up to ``max_batch_size`` inputs, unless its hardware is busy with another
        device's foreground work (background jobs excepted; a device's own further streams
        may join its hardware). If that batch is not full and its oldest job has waited
        less than ``max_queue_delay``, the hardware waits for it rather than giving the
        slot to a lower-ranked job.

        While every free device's hardware is busy and no queued job runs in the
        background, nothing can start: it returns at once, without ranking the queue (the
        kernel calls this on every pass of its loop, i.e. on every arriving request).
        """
        batches: list[Batch] = []
        wake_at: float | None = None
        slots, holders, hardware = dict(devices.free), dict(devices.busy), devices.hardware
        for device, free in slots.items():
            self.adaptive.slots(device, free)
        if not slots or not self.queue:
            return batches, wake_at
        if all(holders.get(hardware.get(d, d), d) != d for d in slots) and not any(
                _kind(job).background(job) for job in self.queue.values()):
            return batches, wake_at
        ranked = sorted(self.queue.values(), key=lambda job: self.policy.rank(job, now))
        taken: set[int] = set()
        for job in ranked:
            if not slots:
                break
            if job.id in taken:
                continue
            kind = _kind(job)
            background = kind.background(job)
            usable = [d for d in kind.candidates(job) if d in slots
                      and (background or holders.get(hardware.get(d, d), d) == d)]
            if not usable:
                continue
            key = kind.batch_key(job)
            config = kind.batching(job)
            if config.adaptive and key is not None:
                config = self.adaptive.config(key, config, now)
            members = [job] if key is None else self._fill(job, key, config, ranked, taken)
            device = min(usable, key=lambda d: (kind.cost(members, d), *devices.load.get(d, ())))
            batch = Batch(device, members, key if key is not None else ("job", job.id))
            oldest = min(m.queued_at for m in members)
            ready_at = oldest + config.max_queue_delay
            slots[device] -= 1
            if not slots[device]:
                del slots[device]
            if not background:
                holders[hardware.get(device, device)] = device  # held or used now
            taken.update(m.id for m in members)
            if key is not None and batch.size < config.max_batch_size and ready_at > now:
                # hold the hardware for this batch; lower-ranked jobs must not jump ahead
                wake_at = ready_at if wake_at is None else min(wake_at, ready_at)
                continue
            for member in members:
                del self.queue[member.id]
            if key is not None:
                self.adaptive.started([m.id for m in members], key, device, now)
            batches.append(batch)
        return batches, wake_at

    def _fill(self, first: Job, key: Hashable, config: BatchingConfig, ranked: list[Job],
              taken: set[int]) -> list[Job]:
        limit = config.max_batch_size
        members, size = [first], _inputs(first)
        for job in ranked:
            if size >= limit:
                break
            if job is first or job.id in taken or _kind(job).batch_key(job) != key:
                continue
            if size + _inputs(job) > limit:
                continue
            members.append(job)
            size += _inputs(job)
        return members


def _kind(job: Job) -> JobQuestions:
    assert job.kind is not None, f"job {job.id} was queued without a kind"
    return job.kind


def _inputs(job: Job) -> int:
    inputs: Any = job.args.get("inputs")
    return len(inputs) if isinstance(inputs, list) else 1
