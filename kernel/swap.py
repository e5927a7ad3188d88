"""The version swap: ``promote`` and ``rollback``, which change the version that serves a
model name without failing a request.

The new version is loaded where the serving one is (a placement job that visits those
hosts one after another, like ``load``), then the serving pointer switches (new requests
go to the new version), and the old version is unloaded once no job that was routed to it
is left. ``rollback`` swaps back to the version that served before, popping the serving
history instead of pushing onto it. A swap back to a version loads it on every host it
served on when it was replaced (in this kernel's lifetime), not only where its replacement
could run (an OpenVINO-only int8 graph). An update that passes its gate promotes through
here (kernel/updates.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llmos.contract.hostwire import TaskOp
from llmos.contract.protocol import ErrorCode, KernelError
from llmos.contract.states import JobState

from .devices import DeviceHost, Task
from .jobs import Job
from .kinds import Core, Handler, JobKind, Request
from .placement import check_memory
from .registry import ModelVersion

if TYPE_CHECKING:
    from .models import ModelOps
    from .scheduler import Batch


def drivers_of(version: ModelVersion) -> list[str] | None:
    """The drivers that can serve a version (None: any; compressed graphs name theirs)."""
    return version.recipe.get("drivers")


def serving_hosts(version: ModelVersion, hosts: list[DeviceHost]) -> list[DeviceHost]:
    """The hosts among ``hosts`` whose driver can serve ``version``; KernelError if none."""
    allowed = drivers_of(version)
    usable = [h for h in hosts if allowed is None or h.spec.name in allowed]
    if not usable:
        raise KernelError(ErrorCode.BAD_REQUEST, f"{version.ref} runs only on "
                          f"{', '.join(allowed or [])} (it is a compressed graph for that runtime)")
    return usable


class VersionSwap(JobKind):
    """``promote`` and ``rollback`` jobs, and the retirement of replaced versions."""

    def __init__(self, core: Core, models: ModelOps) -> None:
        super().__init__(core)
        self.models = models
        #: Versions replaced by a swap, unloaded once no job routed to them is left.
        self._retiring: set[str] = set()
        #: Where each replaced version served (host names) when it was replaced: swapping
        #: back to it loads it there again, not only where its replacement could run.
        self._served_on: dict[str, list[str]] = {}

    def handlers(self) -> dict[str, Handler]:
        return {"promote": self.promote, "rollback": self._rollback}

    def candidates(self, job: Job) -> list[str]:
        return [job.args["targets"][0]]

    def task(self, batch: Batch, host: DeviceHost) -> Task:
        return self.models.placement_task(batch.jobs[0], host)

    def on_done(self, host: DeviceHost, task: Task, body: dict[str, Any],
                buffers: list[bytes], live: list[Job]) -> None:
        for job in live:
            if not self.models.advance(job):
                self._promoted(job)

    def promote(self, request: Request) -> Job | dict[str, Any]:
        """Serve the version the request names."""
        version = self.core.registry.resolve(request.args["model"], request.args["version"])
        return self._swap(request, version)

    def _swap(self, request: Request, new: ModelVersion,
              rollback: bool = False) -> Job | dict[str, Any]:
        """Serve ``new`` instead of the serving version: at once if nothing needs loading,
        else through a job that loads it first. A ``rollback`` pops the serving history
        instead of pushing onto it."""
        current = self.core.registry.resolve(new.model)
        if current.version == new.version:
            return {"model": new.ref, "previous": current.ref, "devices": []}
        hosts = list(self.core.hosts().values())
        serving = [h for h in hosts if current.ref in h.wanted]
        if not serving:  # nothing loaded to swap: only the pointer moves
            self._serve(new, rollback)
            return {"model": new.ref, "previous": current.ref, "devices": []}
        before = set(self._served_on.get(new.ref, ()))
        wanted = serving + [h for h in hosts if h.name in before and h not in serving]
        allowed = drivers_of(new)
        targets = [h for h in wanted if allowed is None or h.spec.name in allowed]
        targets = targets or serving_hosts(new, hosts)
        todo = [h for h in targets if new.ref not in h.wanted]
        if not todo:  # already loaded there: switch now
            self._serve(new, rollback)
            self._replaced(current.ref, serving)
            self.retire()
            return {**self.models.placements(new.ref, targets), "previous": current.ref}
        return self.core.admit(
            request, handle=new.ref, path=str(new.path), previous=current.ref,
            memory=check_memory(new, todo, hosts, self.core.config.memory_budget),
            precision="f32", options={"precision": "f32"},  # as load's
            targets=[h.name for h in todo], tune=[],  # swap fast
            done=[h.name for h in targets if h not in todo], rollback=rollback)

    def _serve(self, version: ModelVersion, rollback: bool) -> None:
        if rollback:
            self.core.registry.pop_serving(version.model)
        else:
            self.core.registry.set_serving(version.model, version.version)

    def _promoted(self, job: Job) -> None:
        """The new version is loaded: switch serving to it, retire the old one. If the
        switch cannot be written (a full disk), the job fails and the old version serves on."""
        name, _, number = job.args["handle"].rpartition(":")
        try:
            self._serve(self.core.registry.resolve(name, int(number)), job.args["rollback"])
        except KernelError as exc:
            self.core.fail(job, JobState.FAILED, exc.code, exc.message)
            return
        hosts = self.core.hosts()
        previous = job.args["previous"]
        self._replaced(previous, [h for h in hosts.values() if previous in h.wanted])
        placed = self.models.placements(job.args["handle"], [hosts[n] for n in job.args["done"]])
        self.core.finish(job, {**placed, "previous": job.args["previous"]})
        self.retire()

    def _replaced(self, handle: str, served_on: list[DeviceHost]) -> None:
        """``handle`` no longer serves: remember its hosts and retire it."""
        self._served_on[handle] = [h.name for h in served_on]
        self._served_on.pop(self.core.registry.resolve(handle.rpartition(":")[0]).ref, None)
        self._retiring.add(handle)

    def retire(self) -> None:
        """Unload retired versions that no unfinished job was routed to."""
        if not self._retiring:
            return
        busy = {job.args.get("handle") for job in self.core.active.values()}
        for handle in sorted(self._retiring - busy):
            self._retiring.discard(handle)
            for host in self.core.hosts().values():
                if handle in host.wanted:
                    self.core.devices.submit(host, Task(TaskOp.UNLOAD, {"handle": handle}))

    def _rollback(self, request: Request) -> Job | dict[str, Any]:
        """Serve again the version that served before the current one."""
        model = request.args["model"]
        current = self.core.registry.resolve(model)
        previous = self.core.registry.previous_serving(model)
        if previous is None:
            raise KernelError(ErrorCode.BAD_REQUEST,
                              f"rollback: {current.ref} is the first version {model} served; "
                              "there is nothing to roll back to")
        return self._swap(request, self.core.registry.resolve(model, previous), rollback=True)
