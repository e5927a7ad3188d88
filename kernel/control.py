"""Control syscalls: process status (jobs, job, stats, drivers, devices) and control
(cancel, renice, shutdown). A mixin of :class:`~llmos.kernel.core.KernelCore`; these
handlers only read or flip job state, so they answer at once whatever runs."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psutil

from llmos.contract.protocol import ErrorCode, KernelError

from .jobs import Job, JobHistory, JobState
from .mixin import CoreServices

if TYPE_CHECKING:
    from .core import Counters, Request
    from .scheduler import BatchingConfig
    from .security import AuditLog


class ControlSyscalls(CoreServices):
    """Status and control handlers."""

    # Provided by other mixins of the core (annotations only: a stub here would shadow them).
    _renice_generation: Callable[[Job], None]
    _model_stats: Callable[[str, int | None], dict[str, Any]]

    batching: BatchingConfig
    audit: AuditLog
    counters: Counters
    history: JobHistory
    per_owner: Counter[str]
    finished_by_state: Counter[str]
    started: float
    stop_requested: threading.Event

    def _drivers(self, request: Request) -> dict[str, Any]:
        rows = []
        for name, spec in self.ext.drivers.items():
            devices = spec.probe()
            batching = spec.batching or self.batching
            rows.append({"name": name, "description": spec.description, "devices": devices,
                         "available": bool(devices),
                         "reason": "" if devices else spec.unavailable_reason(),
                         "batching": {"max_batch_size": batching.max_batch_size,
                                      "max_queue_delay": batching.max_queue_delay}})
        return {"drivers": rows}

    def _devices(self, request: Request) -> dict[str, Any]:
        assert self.devices is not None
        return {"devices": [h.describe() for h in self.devices.hosts.values()]}

    def _jobs(self, request: Request) -> dict[str, Any]:
        owner, finished = request.args["owner"], request.args["finished"]
        if not self._sees_all(request):
            owner = request.owner
        rows = [j.summary() for j in self.active.values() if owner is None or j.owner == owner]
        if finished:
            rows += self.history.summaries(owner)
        return {"jobs": sorted(rows, key=lambda r: r["id"])}

    @staticmethod
    def _sees_all(request: Request) -> bool:
        """Local users and admin keys see and control every job; other keys their own."""
        return not request.principal.authenticated or request.principal.may("admin")

    def _find(self, request: Request) -> Job | dict[str, Any]:
        """The unfinished job named by ``request.args["id"]``, or a finished one's summary,
        if the caller may see it; KernelError(NOT_FOUND) otherwise."""
        job_id = request.args["id"]
        found: Job | dict[str, Any] | None = self.active.get(job_id)
        if found is None:
            found = self.history.get(job_id)
        owner = found.owner if isinstance(found, Job) else (found or {}).get("owner")
        if found is None or not (self._sees_all(request) or owner == request.owner):
            raise KernelError(ErrorCode.NOT_FOUND, f"no job {job_id}")
        return found

    def _find_unfinished(self, request: Request) -> Job:
        """The unfinished job named by ``request.args["id"]``; KernelError(BAD_REQUEST) when
        it already ended, NOT_FOUND when the caller cannot see it."""
        found = self._find(request)
        if not isinstance(found, Job):
            raise KernelError(ErrorCode.BAD_REQUEST,
                              f"job {found['id']} already ended ({found['state']})")
        return found

    def _job(self, request: Request) -> dict[str, Any]:
        found = self._find(request)
        return found.summary() if isinstance(found, Job) else found

    def _cancel(self, request: Request) -> dict[str, Any]:
        job = self._find_unfinished(request)
        self._fail(job, JobState.CANCELLED, ErrorCode.CANCELLED,
                   f"job {job.id} was cancelled by {request.owner}")
        return job.summary()

    def _renice(self, request: Request) -> dict[str, Any]:
        job = self._find_unfinished(request)
        job.priority = request.args["priority"]
        if job.syscall == "generate" and job.state in (JobState.RUNNING, JobState.PREEMPTED):
            self._renice_generation(job)
        return job.summary()

    def _stats(self, request: Request) -> dict[str, Any]:
        if request.args["model"] is not None:
            return self._model_stats(request.args["model"], request.args["version"])
        assert self.devices is not None
        states = Counter(str(j.state) for j in self.active.values())
        return {
            "uptime": time.time() - self.started, "pid": os.getpid(),
            "rss": psutil.Process().memory_info().rss,
            "received": self.counters.received, "rejected": self.counters.rejected,
            "replies": self.counters.replies, "dropped_replies": self.counters.dropped_replies,
            "audit_failures": self.audit.failures,
            "queued": len(self.scheduler), "active": dict(states),
            "finished": dict(self.finished_by_state), "clients": dict(self.per_owner),
            "devices": {h.name: {"state": str(h.state), "inflight": len(h.inflight),
                                 "restarts": h.restarts, "rss": h.rss}
                        for h in self.devices.hosts.values()},
        }

    def _shutdown(self, request: Request) -> dict[str, Any]:
        self.stop_requested.set()
        return {"stopping": True}
