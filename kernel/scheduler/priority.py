"""Priority with aging: lower nice values run first, and waiting raises a job's priority."""

from __future__ import annotations

from llmos.contract.hookspecs import hookimpl

from ..jobs import Job
from ..registries import PolicyRegistry


class PriorityPolicy:
    """Effective priority = nice - seconds queued / ``aging_seconds``; ties go to the older job.

    With the default of 2 s per level, a job at nice 19 waiting behind a stream of nice -20
    jobs overtakes them after 78 s: low priority is delayed, never starved.
    """

    name = "priority"

    def __init__(self, aging_seconds: float = 2.0) -> None:
        if aging_seconds <= 0:
            raise ValueError("aging_seconds must be positive")
        self.aging_seconds = aging_seconds

    def rank(self, job: Job, now: float) -> tuple[float, ...]:
        waited = max(0.0, now - job.queued_at)
        return (job.priority - waited / self.aging_seconds, job.id)


@hookimpl
def llmos_register_policies(policies: PolicyRegistry) -> None:
    policies.add(PriorityPolicy.name, PriorityPolicy)
