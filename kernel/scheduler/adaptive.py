"""Adaptive batching: batch size and queue delay picked from the observed load.

For each batch key (a model and task), :class:`AdaptiveBatching` follows the inputs
outstanding (queued or running), how long its batches take from dispatch to done, and how
many batches at once the devices that ran it take (their streams). From these it picks:

* **max batch size** = ceil(peak outstanding / (streams + 1)), within 1..the configured
  ceiling. The outstanding requests split into one group per stream plus one: while each
  stream computes a group, the group before it travels back to its clients and returns,
  so the hardware does not wait for round trips (closed-loop clients), and a single
  client's request runs at once. A backlog (open loop, more load than the device serves)
  raises the peak and so the batch size, up to the ceiling. The peak follows a rise at
  once and halves every ``PEAK_HALF_LIFE`` seconds after the load falls.
* **max queue delay** = ``DELAY_SHARE`` of the key's mean batch time (at most
  ``MAX_DELAY``): a partial batch waits that long for the rest of its group. Until a batch
  of the key has been timed, the configured delay.

The scheduler calls :meth:`queued`, :meth:`dropped`, :meth:`started` and :meth:`config`;
the kernel calls :meth:`finished` when a batch's task is done (``Scheduler.finished``).
A batch never reported finished is forgotten after ``STALE_SECONDS``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import BatchingConfig

#: Seconds for the peak of outstanding inputs to halve once the load falls.
PEAK_HALF_LIFE = 1.0
#: Share of a batch's measured time that a partial batch may wait for more inputs.
DELAY_SHARE = 0.125
#: Longest queue delay chosen, in seconds.
MAX_DELAY = 0.02
#: Weight of the newest batch time in the running mean.
TIME_WEIGHT = 0.2
#: A dispatched batch not reported finished after this many seconds is forgotten.
STALE_SECONDS = 300.0


@dataclass(slots=True)
class _KeyLoad:
    """What is known of one batch key's load."""

    outstanding: int = 0
    peak: float = 0.0
    peak_at: float = 0.0
    batch_seconds: float | None = None
    #: Devices that ran this key's batches, and when they last did.
    devices: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class AdaptiveBatching:
    """Load per batch key; see the module docstring. Times are ``time.monotonic()``."""

    keys: dict[Hashable, _KeyLoad] = field(default_factory=dict)
    #: Most batches each device was seen to take at once (its streams).
    streams: dict[str, int] = field(default_factory=dict)
    #: Tracked jobs (queued or running): id -> (key, inputs, running).
    jobs: dict[int, tuple[Hashable, int, bool]] = field(default_factory=dict)
    #: Running batches by their first job's id: (dispatch time, key).
    batches: dict[int, tuple[float, Hashable]] = field(default_factory=dict)
    _dispatch_order: deque[tuple[float, int, tuple[int, ...]]] = field(default_factory=deque)

    def queued(self, job_id: int, key: Hashable, inputs: int, now: float) -> None:
        """A job of ``key`` entered the queue (again, after a requeue: counted once)."""
        tracked = self.jobs.get(job_id)
        if tracked is not None:
            self.jobs[job_id] = (tracked[0], tracked[1], False)
            return
        self.jobs[job_id] = (key, inputs, False)
        load = self.keys.setdefault(key, _KeyLoad())
        load.outstanding += inputs
        decayed = load.peak * 0.5 ** ((now - load.peak_at) / PEAK_HALF_LIFE)
        if load.outstanding >= decayed:
            load.peak, load.peak_at = load.outstanding, now

    def dropped(self, job_id: int) -> None:
        """A queued job left the queue without running (cancelled, failed, timed out)."""
        tracked = self.jobs.pop(job_id, None)
        if tracked is not None:
            self.keys[tracked[0]].outstanding -= tracked[1]

    def slots(self, device: str, free: int) -> None:
        """``device`` takes ``free`` more batches now (its streams are at least that)."""
        if free > self.streams.get(device, 0):
            self.streams[device] = free

    def started(self, job_ids: list[int], key: Hashable, device: str, now: float) -> None:
        """A batch of these tracked jobs was dispatched to ``device``."""
        for job_id in job_ids:
            tracked = self.jobs.get(job_id)
            if tracked is not None:
                self.jobs[job_id] = (tracked[0], tracked[1], True)
        self.batches[job_ids[0]] = (now, key)
        self.keys.setdefault(key, _KeyLoad()).devices[device] = now
        self._dispatch_order.append((now, job_ids[0], tuple(job_ids)))
        while self._dispatch_order and self._dispatch_order[0][0] < now - STALE_SECONDS:
            _, first, ids = self._dispatch_order.popleft()
            if self.batches.pop(first, None) is not None:
                self._release(ids)

    def finished(self, job_ids: Iterable[int], now: float) -> None:
        """The batch of these jobs (in dispatch order) is done, whatever its outcome."""
        ids = list(job_ids)
        if not ids:
            return
        begun = self.batches.pop(ids[0], None)
        self._release(ids)
        if begun is None:
            return
        load = self.keys.get(begun[1])
        if load is not None:
            seconds = now - begun[0]
            load.batch_seconds = seconds if load.batch_seconds is None else \
                (1 - TIME_WEIGHT) * load.batch_seconds + TIME_WEIGHT * seconds

    def config(self, key: Hashable, ceiling: BatchingConfig, now: float) -> BatchingConfig:
        """The knobs for ``key`` now: at most ``ceiling.max_batch_size`` inputs, and the
        delay chosen from its batch time (``ceiling.max_queue_delay`` until timed)."""
        load = self.keys.setdefault(key, _KeyLoad())
        for device, used in list(load.devices.items()):
            if used < now - STALE_SECONDS:
                del load.devices[device]
        streams = sum(self.streams.get(d, 1) for d in load.devices) or 1
        peak = max(load.outstanding, load.peak * 0.5 ** ((now - load.peak_at) / PEAK_HALF_LIFE))
        size = min(ceiling.max_batch_size, max(1, math.ceil(peak / (streams + 1))))
        delay = ceiling.max_queue_delay if load.batch_seconds is None \
            else min(MAX_DELAY, DELAY_SHARE * load.batch_seconds)
        return replace(ceiling, max_batch_size=size, max_queue_delay=delay)

    def _release(self, job_ids: Iterable[int]) -> None:
        """Stop counting these jobs if they are running (a requeued one is queued again)."""
        for job_id in job_ids:
            tracked = self.jobs.get(job_id)
            if tracked is not None and tracked[2]:
                del self.jobs[job_id]
                self.keys[tracked[0]].outstanding -= tracked[1]
