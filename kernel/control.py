"""Control syscalls: process status (jobs, job, stats, drivers, devices) and control
(cancel, renice, shutdown). These handlers only read or flip job state, so they answer at
once whatever runs."""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import psutil

from llmos.contract.protocol import ErrorCode, KernelError

from .jobs import Job, JobState
from .kinds import Core, Handler, JobKind, Request

if TYPE_CHECKING:
    from .learning import Learning


class Control(JobKind):
    """Status and control handlers (no jobs of their own)."""

    def __init__(self, core: Core, learning: Learning) -> None:
        super().__init__(core)
        self.learning = learning

    def handlers(self) -> dict[str, Handler]:
        return {"drivers": self._drivers, "devices": self._devices, "jobs": self._jobs,
                "job": self._job, "cancel": self._cancel, "renice": self._renice,
                "stats": self._stats, "shutdown": self._shutdown, "noop": self._noop}

    def _drivers(self, request: Request) -> dict[str, Any]:
        rows = []
        for name, spec in self.core.ext.drivers.items():
            devices = spec.probe()
            batching = spec.batching or self.core.batching
            rows.append({"name": name, "description": spec.description, "devices": devices,
                         "available": bool(devices),
                         "reason": "" if devices else spec.unavailable_reason(),
                         "batching": {"max_batch_size": batching.max_batch_size,
                                      "max_queue_delay": batching.max_queue_delay}})
        return {"drivers": rows}

    def _devices(self, request: Request) -> dict[str, Any]:
        return {"devices": [h.describe() for h in self.core.devices.hosts.values()]}

    def _jobs(self, request: Request) -> dict[str, Any]:
        owner, finished = request.args["owner"], request.args["finished"]
        if not self._sees_all(request):
            owner = request.owner
        rows = [j.summary() for j in self.core.active.values() if owner is None or j.owner == owner]
        if finished:
            rows += self.core.history.summaries(owner)
        return {"jobs": sorted(rows, key=lambda r: r["id"])}

    @staticmethod
    def _sees_all(request: Request) -> bool:
        """Local users and admin keys see and control every job; other keys their own."""
        return not request.principal.authenticated or request.principal.may("admin")

    def _find(self, request: Request) -> Job | dict[str, Any]:
        """The unfinished job named by ``request.args["id"]``, or a finished one's summary,
        if the caller may see it; KernelError(NOT_FOUND) otherwise."""
        job_id = request.args["id"]
        found: Job | dict[str, Any] | None = self.core.active.get(job_id)
        if found is None:
            found = self.core.history.get(job_id)
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
        self.core.fail(job, JobState.CANCELLED, ErrorCode.CANCELLED,
                   f"job {job.id} was cancelled by {request.owner}")
        return job.summary()

    def _renice(self, request: Request) -> dict[str, Any]:
        job = self._find_unfinished(request)
        job.priority = request.args["priority"]
        job.kind.on_renice(job)
        return job.summary()

    def _stats(self, request: Request) -> dict[str, Any]:
        if request.args["model"] is not None:
            return self.learning.model_stats(request.args["model"], request.args["version"])
        states = Counter(str(j.state) for j in self.core.active.values())
        return {
            "uptime": time.time() - self.core.started, "pid": os.getpid(),
            "rss": psutil.Process().memory_info().rss,
            "received": self.core.counters.received, "rejected": self.core.counters.rejected,
            "replies": self.core.counters.replies, "dropped_replies": self.core.counters.dropped_replies,
            "audit_failures": self.core.audit.failures,
            "queued": len(self.core.scheduler), "active": dict(states),
            "finished": dict(self.core.finished_by_state), "clients": dict(self.core.per_owner),
            "devices": {h.name: {"state": str(h.state), "inflight": len(h.inflight),
                                 "restarts": h.restarts, "rss": h.rss}
                        for h in self.core.devices.hosts.values()},
        }

    @staticmethod
    def _noop(request: Request) -> dict[str, Any]:
        """Nothing, answered by the scheduling loop: the round trip through the core."""
        return {}

    def _shutdown(self, request: Request) -> dict[str, Any]:
        self.core.stop_requested.set()
        return {"stopping": True}
