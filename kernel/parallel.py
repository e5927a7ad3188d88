"""Parallel plans in the kernel: replicas and pipeline stages for ``load``, DDP for ``train``.

The plan for a request comes from the firstresult hook ``llmos_plan_parallelism`` (the
built-in one is in :mod:`llmos.plugins.parallel`). The kernel carries it out here:

* **replicas**: N dedicated driver hosts (``torch:cpu.r1`` .. ``.rN``) each load the model;
  on a CPU each gets ``threads // N`` threads and its own scheduling lane, so replicas run
  batches at the same time; the scheduler sends each batch to the free replica with the
  least outstanding work (the cost model cannot tell identical replicas apart);
* **stages**: N hosts of the ``pipeline`` driver (``pipeline:cpu.s1`` ..) each load a
  contiguous slice of the model's layers; an ``infer`` batch runs on stage 1, and each
  stage's activations travel to the next as raw tensor frames (``stage`` host tasks);
* **ddp**: nothing here beyond the plan; the driver host that trains launches the ranks
  (see :mod:`llmos.plugins.parallel.ddp`).

:class:`Parallel` is a service of the core that the model operations, inference and
training use (no framework import: the kernel process stays light).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmos.contract.hostwire import TaskOp
from llmos.contract.protocol import ErrorCode, KernelError
from llmos.contract.syscalls import MAX_REPLICAS, MAX_STAGES, MAX_WORLD_SIZE

from .devices import DeviceHost, HostState, Task, hardware_of
from .jobs import Job, JobState
from .placement import check_memory

if TYPE_CHECKING:
    import pluggy

    from .kinds import Core
    from .registry import ModelVersion

#: The driver that serves pipeline stages (registered by the parallel plugin).
PIPELINE_DRIVER = "pipeline"


@dataclass(frozen=True, slots=True)
class Plan:
    """How one request runs in parallel; the defaults mean "not at all"."""

    #: Driver hosts that each hold the whole model (``load``).
    replicas: int = 1
    #: Driver hosts that each hold a slice of the layers, in order (``load``).
    stages: int = 1
    #: DDP ranks of a ``train`` job in all (1: ordinary single-process training).
    world_size: int = 1
    #: Ranks started on this machine (rank 0 included); the others join with
    #: ``llmos kernel join``. 0 means all of them.
    local_ranks: int = 0
    #: The rendezvous (rank 0's TCPStore) address and port; 0 picks a free port.
    master_addr: str = "127.0.0.1"
    master_port: int = 0

    def check(self) -> None:
        """KernelError(BAD_REQUEST) unless every field is in range and the plan is coherent."""
        limits = (("replicas", self.replicas, MAX_REPLICAS), ("stages", self.stages, MAX_STAGES),
                  ("world_size", self.world_size, MAX_WORLD_SIZE))
        for name, value, limit in limits:
            if not 1 <= value <= limit:
                raise KernelError(ErrorCode.BAD_REQUEST, f"plan: {name} must be 1..{limit}, got {value}")
        if self.replicas > 1 and self.stages > 1:
            raise KernelError(ErrorCode.BAD_REQUEST, "plan: replicas and stages cannot be combined")
        if not 0 <= self.local_ranks <= self.world_size:
            raise KernelError(ErrorCode.BAD_REQUEST, f"plan: local_ranks must be 0..{self.world_size}")
        if self.world_size > 1 and not 0 <= self.master_port < 65536:
            raise KernelError(ErrorCode.BAD_REQUEST, "plan: master_port must be 0..65535")

    def ddp(self) -> dict[str, Any] | None:
        """What a train task carries for DDP (None for single-process training)."""
        if self.world_size == 1:
            return None
        return {"world_size": self.world_size, "local_ranks": self.local_ranks or self.world_size,
                "master_addr": self.master_addr, "master_port": self.master_port}


def plan_for(pm: pluggy.PluginManager, syscall: str, args: dict[str, Any],
             devices: list[dict[str, Any]]) -> Plan:
    """The plan the hook chooses; a request that asks for parallelism nobody plans is refused."""
    plan = pm.hook.llmos_plan_parallelism(syscall=syscall, args=dict(args), devices=devices)
    if plan is None:
        asked = [k for k in ("replicas", "stages", "world_size") if (args.get(k) or 1) > 1]
        if asked or args.get("parallel") not in (None, "none"):
            what = ", ".join(asked) or "parallel"
            raise KernelError(ErrorCode.BAD_REQUEST, f"{syscall}: no plugin plans parallelism "
                              f"here ({what} asked); is llmos.plugins.parallel disabled?")
        return Plan()
    if not isinstance(plan, Plan):
        raise KernelError(ErrorCode.INTERNAL, f"a llmos_plan_parallelism hook returned {plan!r}")
    plan.check()
    return plan


class Parallel:
    """Replica and stage hosts, and forwarding activations from one stage to the next."""

    def __init__(self, core: Core) -> None:
        self.core = core

    def plan(self, syscall: str, args: dict[str, Any]) -> Plan:
        devices = [host.describe() for host in self.core.hosts().values()]
        return plan_for(self.core.pm, syscall, args, devices)

    def hosts_for(self, version: ModelVersion, plan: Plan, device: str | None,
                        driver: str | None) -> list[DeviceHost]:
        """The replica or stage hosts for ``version``, started now if they do not exist."""
        hosts = self.core.hosts()
        if device is not None and device not in hosts:
            raise KernelError(ErrorCode.NOT_FOUND,
                              f"unknown device {device!r} (devices: {', '.join(sorted(hosts))})")
        where = hosts[device].device if device is not None else "cpu"
        if plan.stages > 1:
            spec, count, tag = self.core.ext.drivers.get(PIPELINE_DRIVER), plan.stages, "s"
        else:
            name = driver or (hosts[device].spec.name if device is not None else "torch")
            spec, count, tag = self.core.ext.drivers.get(name), plan.replicas, "r"
        names = [f"{spec.name}:{where}.{tag}{k}" for k in range(1, count + 1)]
        fresh = [n for n in names if n not in hosts or hosts[n].state is HostState.FAILED]
        if fresh:
            template = DeviceHost("template", spec, where, 1)
            check_memory(version, [template] * len(fresh), hosts.values(),
                         self.core.config.memory_budget)
        threads = max(1, self.core.config.threads // count) if hardware_of(where) == "cpu" \
            else self.core.config.threads
        chosen = []
        for k, name in enumerate(names, 1):
            role: dict[str, Any] = {"model": version.ref}
            if tag == "s":
                role.update(stage=k, stages=count, next=names[k] if k < count else None)
            else:
                role.update(replica=k, replicas=count)
            if name in fresh:
                self.core.devices.add(spec, where, threads, name=name, lane=f"{tag}{k}", role=role)
            chosen.append(self.core.hosts()[name])
        return chosen

    def pipeline_loaded(self, host: DeviceHost, handle: str) -> bool:
        """Whether every stage after ``host`` holds ``handle`` (always, for a plain host):
        while a stage restarts and reloads, batches wait in the queue instead of failing.
        A stage that is gone or failed for good counts as ready, so that its batches fail
        at once (DEVICE_FAILED) rather than wait forever."""
        hosts = self.core.hosts()
        following = host.role.get("next")
        while following:
            stage = hosts.get(following)
            if stage is None or stage.state is HostState.FAILED:
                return True
            if handle not in stage.loaded:
                return False
            following = stage.role.get("next")
        return True

    def forward_stage(self, host: DeviceHost, task: Task, body: dict[str, Any],
                       buffers: list[bytes], jobs: list[Job]) -> None:
        """Send a stage's activations (raw tensor frames) on to the next stage's host. If
        that stage is restarting (it died after the batch entered the pipeline), the jobs
        go back to the queue and run again from the first stage once it has reloaded; if it
        is gone or failed for good, they fail."""
        following = self.core.hosts().get(host.role["next"])
        if following is None or following.state is HostState.FAILED:
            for job in jobs:
                self.core.fail(job, JobState.FAILED, ErrorCode.DEVICE_FAILED,
                           f"pipeline stage {host.role['next']} has failed")
            return
        if following.state is not HostState.READY or task.payload["handle"] not in following.loaded:
            for job in jobs:
                job.transition(JobState.QUEUED)
                job.device = None
                self.core.scheduler.push(job)
            return
        payload = {"handle": task.payload["handle"], "kind": task.payload["kind"],
                   "arrays": body["arrays"]}
        self.core.devices.submit(following, Task(TaskOp.STAGE, payload, task.jobs, buffers=buffers))

    def retire_host(self, host: DeviceHost, handle: str) -> None:
        """Stop a replica or stage host once the model it was started for is unloaded."""
        if host.role.get("model") == handle and not host.wanted:
                self.core.devices.remove(host.name)
