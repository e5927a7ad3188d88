"""Jobs: the kernel's processes, with an explicit table of allowed state transitions."""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack

from llmos.contract.protocol import ErrorCode, KernelError
from llmos.contract.states import JobState

if TYPE_CHECKING:
    from .kinds import JobKind

#: Every transition a job may make. RUNNING -> QUEUED is the requeue after a driver host died.
ALLOWED_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset(
        {JobState.RUNNING, JobState.CANCELLED, JobState.TIMED_OUT, JobState.FAILED}
    ),
    JobState.RUNNING: frozenset({
        JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.TIMED_OUT,
        JobState.PREEMPTED, JobState.QUEUED,
    }),
    JobState.PREEMPTED: frozenset(
        {JobState.RUNNING, JobState.QUEUED, JobState.CANCELLED, JobState.TIMED_OUT,
         JobState.FAILED}
    ),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
    JobState.TIMED_OUT: frozenset(),
}

_job_ids = itertools.count(1)


def continue_ids_after(last: int) -> None:
    """Number new jobs after ``last`` (the journal's highest id), so ids stay unique
    across kernel restarts."""
    global _job_ids
    _job_ids = itertools.count(last + 1)


@dataclass(slots=True)
class Job:
    """One unit of work submitted by a client.

    ``priority`` is a nice value (-20 most urgent .. 19 least); ``deadline`` is an absolute
    ``time.monotonic()`` value or None. Resource fields are filled by the driver host.
    """

    syscall: str
    owner: str
    args: dict[str, Any]
    priority: int = 0
    deadline: float | None = None
    id: int = field(default_factory=lambda: next(_job_ids))
    state: JobState = JobState.QUEUED
    created_at: float = field(default_factory=time.time)
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    finished_at: float | None = None
    device: str | None = None
    attempts: int = 0
    cpu_seconds: float = 0.0
    peak_memory: int = 0
    tokens: int = 0
    error: str | None = None
    #: The latest progress a long job reported (step, loss, throughput, ETA...).
    progress: dict[str, Any] = field(default_factory=dict)
    #: The submitter asked for events (accepted, progress).
    wants_events: bool = False
    #: Who to answer: (peer identity, request id); None once answered.
    reply_route: tuple[bytes, str] | None = None
    #: Bytes of the request that made it, held by the kernel until the job ends.
    request_bytes: int = 0
    #: What kind of work it is, decided at admission (kernel/kinds.py).
    kind: JobKind | None = None

    def transition(self, new: JobState) -> None:
        """Move to ``new``; raises KernelError(INTERNAL) for a transition the table forbids."""
        if new not in ALLOWED_TRANSITIONS[self.state]:
            raise KernelError(ErrorCode.INTERNAL, f"job {self.id}: {self.state} -> {new} not allowed")
        self.state = new
        if new is JobState.RUNNING:
            self.started_at = time.time()
        elif new is JobState.QUEUED:
            self.queued_at = time.monotonic()
        elif new.finished:
            self.finished_at = time.time()

    def summary(self) -> dict[str, Any]:
        """What `jobs` and `job` report (no inputs, which may be private or large)."""
        return {
            "id": self.id, "owner": self.owner, "syscall": self.syscall,
            "model": self.args.get("model"), "priority": self.priority, "state": str(self.state),
            "device": self.device, "created_at": self.created_at, "started_at": self.started_at,
            "finished_at": self.finished_at, "attempts": self.attempts,
            "cpu_seconds": round(self.cpu_seconds, 4), "peak_memory": self.peak_memory,
            "tokens": self.tokens, "error": self.error, "progress": self.progress,
        }


#: The finished-job history keeps at most this many bytes of packed summaries, besides
#: at most ``KernelConfig.history`` (1000) jobs.
HISTORY_MAX_BYTES = 2 * 2**20
#: A finished job's error text is kept up to this many characters; its progress map only
#: when it packs into at most this many bytes (else ``{}``).
MAX_ERROR_CHARS = 1024
MAX_PROGRESS_BYTES = 2048


class JobHistory:
    """Summaries of finished jobs, oldest first, bounded by count and by total bytes.

    An entry is the job's :meth:`Job.summary`, packed with msgpack, with its error cut to
    MAX_ERROR_CHARS and a progress map over MAX_PROGRESS_BYTES left out; no arguments or
    inputs are kept, so what a client sent never outlives its job. :meth:`append` evicts
    the oldest entries until both caps hold.
    """

    def __init__(self, max_jobs: int, max_bytes: int = HISTORY_MAX_BYTES) -> None:
        self.max_jobs = max_jobs
        self.max_bytes = max_bytes
        #: Packed summary bytes held now.
        self.nbytes = 0
        self._entries: OrderedDict[int, tuple[str, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, job: Job) -> None:
        """Remember a finished job's bounded summary, evicting the oldest past a cap."""
        packed = msgpack.packb(_bounded_summary(job), use_bin_type=True)
        self._entries[job.id] = (job.owner, packed)
        self.nbytes += len(packed)
        while self._entries and (len(self._entries) > self.max_jobs
                                 or self.nbytes > self.max_bytes):
            _, (_, oldest) = self._entries.popitem(last=False)
            self.nbytes -= len(oldest)

    def get(self, job_id: int) -> dict[str, Any] | None:
        """The summary of finished job ``job_id``, or None when it is not remembered."""
        entry = self._entries.get(job_id)
        return None if entry is None else msgpack.unpackb(entry[1])

    def summaries(self, owner: str | None = None) -> list[dict[str, Any]]:
        """Remembered summaries, oldest first; only ``owner``'s when one is given."""
        return [msgpack.unpackb(packed) for who, packed in self._entries.values()
                if owner is None or who == owner]


def _bounded_summary(job: Job) -> dict[str, Any]:
    """``job.summary()`` with its error cut to MAX_ERROR_CHARS and an oversized progress
    map left out (``{}``)."""
    summary = job.summary()
    if job.error is not None and len(job.error) > MAX_ERROR_CHARS:
        summary["error"] = f"{job.error[:MAX_ERROR_CHARS]}..."
    if len(msgpack.packb(job.progress, use_bin_type=True)) > MAX_PROGRESS_BYTES:
        summary["progress"] = {}
    return summary
