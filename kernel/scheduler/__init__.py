"""The scheduler: ranks queued jobs with a policy plugin and forms batches for free devices.

Called once per pass of the kernel's scheduling loop; it never touches sockets. The policy
decides order; this module decides grouping (dynamic batching of compatible ``infer`` jobs,
Triton's max batch size and max queue delay, fixed or picked from the observed load by
:mod:`.adaptive`) and placement onto free devices.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from collections.abc import Set as AbstractSet
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


@dataclass(slots=True)
class Scheduler:
    """Holds the run queue.

    ``batch_key(job)`` returns a key shared by jobs that may run in one batch, or None for a
    job that runs alone. ``candidates(job)`` lists the devices that can run it now (e.g. where
    its model is loaded). ``batching(job)`` gives the knobs for its model. ``cost(jobs,
    device)`` predicts a batch's run time on a device (the cheapest free one is chosen), and
    ``hardware(device)`` names what a device runs on: one device's foreground work at a time
    per hardware (that device may run several batches at once, one per stream).
    ``load(device)`` breaks ties between equally cheap devices (e.g. identical replicas):
    the least outstanding work goes first. For adaptive batching, the kernel reports each
    dispatched batch's end with :meth:`finished`.
    """

    policy: Policy
    batch_key: Callable[[Job], Hashable | None]
    candidates: Callable[[Job], list[str]]
    batching: Callable[[Job], BatchingConfig]
    cost: Callable[[list[Job], str], float] = lambda jobs, device: 0.0
    hardware: Callable[[str], str] = lambda device: device
    #: Jobs that run in the background of their hardware (training, on fewer cores): they
    #: may start while the hardware is busy and do not make it busy.
    background: Callable[[Job], bool] = lambda job: False
    load: Callable[[str], tuple[float, ...]] = lambda device: ()
    queue: dict[int, Job] = field(default_factory=dict)
    adaptive: AdaptiveBatching = field(default_factory=AdaptiveBatching)

    def push(self, job: Job) -> None:
        """Queue a job (again, after a requeue), as of its ``queued_at``."""
        self.queue[job.id] = job
        key = self.batch_key(job)
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

    def schedule(self, free_devices: Mapping[str, int] | AbstractSet[str], now: float,
                 busy_hardware: Mapping[str, str] | AbstractSet[str] = frozenset(),
                 ) -> tuple[list[Batch], float | None]:
        """Batches to dispatch now, and the time at which a waiting batch becomes ready.

        ``free_devices`` maps each device that can take work to how many more batches it
        takes now (a set means one each: a device with several streams takes several);
        ``busy_hardware`` maps hardware running foreground work to the device running it
        (a set: held by nobody who may add to it). A free device takes the highest-ranked
        job it can run, plus compatible jobs in rank order up to ``max_batch_size`` inputs,
        unless its hardware is busy with another device's foreground work (background jobs
        excepted; a device's own further streams may join its hardware). If that batch is
        not full and its oldest job has waited less than ``max_queue_delay``, the hardware
        waits for it rather than giving the slot to a lower-ranked job.

        While every free device's hardware is busy and no queued job runs in the
        background, nothing can start: it returns at once, without ranking the queue (the
        kernel calls this on every pass of its loop, i.e. on every arriving request).
        """
        batches: list[Batch] = []
        wake_at: float | None = None
        slots = dict(free_devices) if isinstance(free_devices, Mapping) \
            else dict.fromkeys(free_devices, 1)
        holders = dict(busy_hardware) if isinstance(busy_hardware, Mapping) \
            else dict.fromkeys(busy_hardware, "")
        for device, free in slots.items():
            self.adaptive.slots(device, free)
        if not slots or not self.queue:
            return batches, wake_at
        if all(holders.get(self.hardware(d), d) != d for d in slots) and not any(
                self.background(job) for job in self.queue.values()):
            return batches, wake_at
        ranked = sorted(self.queue.values(), key=lambda job: self.policy.rank(job, now))
        taken: set[int] = set()
        for job in ranked:
            if not slots:
                break
            if job.id in taken:
                continue
            background = self.background(job)
            devices = [d for d in self.candidates(job) if d in slots
                       and (background or holders.get(self.hardware(d), d) == d)]
            if not devices:
                continue
            key = self.batch_key(job)
            config = self.batching(job)
            if config.adaptive and key is not None:
                config = self.adaptive.config(key, config, now)
            members = [job] if key is None else self._fill(job, key, config, ranked, taken)
            device = min(devices, key=lambda d: (self.cost(members, d), *self.load(d)))
            batch = Batch(device, members, key if key is not None else ("job", job.id))
            oldest = min(m.queued_at for m in members)
            ready_at = oldest + config.max_queue_delay
            slots[device] -= 1
            if not slots[device]:
                del slots[device]
            if not background:
                holders[self.hardware(device)] = device  # held or used now
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
            if job is first or job.id in taken or self.batch_key(job) != key:
                continue
            if size + _inputs(job) > limit:
                continue
            members.append(job)
            size += _inputs(job)
        return members


def _inputs(job: Job) -> int:
    inputs: Any = job.args.get("inputs")
    return len(inputs) if isinstance(inputs, list) else 1
