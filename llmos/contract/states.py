"""Closed sets every client sees: the states of a job and why a generation ended."""

from __future__ import annotations

import enum


class JobState(enum.StrEnum):
    """A job's state (``jobs``, ``job``, events); the kernel's allowed transitions are in
    :data:`llmos.kernel.jobs.ALLOWED_TRANSITIONS`."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    PREEMPTED = "PREEMPTED"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED, JobState.TIMED_OUT})


class FinishReason(enum.StrEnum):
    """Why a generation ended (``finish_reason``, as in OpenAI's API)."""

    #: The model ended its answer, or a stop string was generated.
    STOP = "stop"
    #: ``max_tokens`` (or the model's context) was reached.
    LENGTH = "length"
    #: Stopped on the host before the end (the model was unloaded, the job cancelled).
    CANCELLED = "cancelled"
