"""First in, first out: jobs run in the order they were submitted."""

from __future__ import annotations

from llmos.contract.hookspecs import hookimpl

from ..jobs import Job
from ..registries import PolicyRegistry


class FifoPolicy:
    """Rank by submission order; a requeued job keeps its place at the front."""

    name = "fifo"

    def rank(self, job: Job, now: float) -> tuple[float, ...]:
        return (job.id,)


@hookimpl
def llmos_register_policies(policies: PolicyRegistry) -> None:
    policies.add(FifoPolicy.name, FifoPolicy)
