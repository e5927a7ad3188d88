"""Compression syscalls: ``compress`` (a recipe as a time-sliced job) and ``promote`` (hot swap).

A mixin of :class:`~llmos.kernel.core.KernelCore`. A compress job runs where training runs:
quanta of ``compress`` tasks on a host whose driver trains (the torch host), in the
background of that hardware, with progress events between quanta (see
:mod:`llmos.plugins.compression.session`). The recipe is checked against the steps plugins
registered before any job exists, so a bad recipe writes nothing. When the last quantum
ends, a result that passed the quality gate becomes a new version (parent, recipe, the
report as metrics); one that failed leaves no version and the reply says why.

``promote`` (and ``rollback``, which swaps back to the version that served before) makes a
version the one that serves its model name without failing a request:
the new version is loaded where the serving one is, then the serving pointer switches (new
requests go to the new version), and the old version is unloaded once no job that was
routed to it is left.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmos.contract.protocol import ErrorCode, KernelError

from .devices import DeviceHost, Task
from .jobs import Job, JobState
from .mixin import CoreServices
from .registry import ModelVersion, check_name

if TYPE_CHECKING:
    from .core import Request


#: The recipes ``compress --search`` tries (each from the parent); the Pareto front of
#: those within the gate become versions.
SEARCH_GRID: list[list[dict[str, Any]]] = [
    [{"step": "quantize", "method": "openvino-int8"}],
    [{"step": "quantize", "method": "openvino-int8-weights"}],
    [{"step": "quantize", "method": "onnxruntime-int8"}],
    [{"step": "prune", "sparsity": 0.5}, {"step": "quantize", "method": "openvino-int8"}],
    [{"step": "prune", "method": "neurons", "sparsity": 0.25},
     {"step": "quantize", "method": "openvino-int8"}],
    [{"step": "quantize", "method": "fp16"}],
]


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


class CompressionSyscalls(CoreServices):
    """Handlers and completion logic for compress and promote jobs."""

    #: Versions replaced by ``promote``, unloaded once no job routed to them is left.
    _retiring: set[str]
    _trainers: Callable[[], list[str]]
    _data_spec: Callable[[dict[str, Any]], dict[str, str]]
    _check_memory: Callable[[ModelVersion, list[DeviceHost]], int]
    _placements: Callable[[str, list[DeviceHost]], dict[str, Any]]
    _next_quantum: Callable[[Job, dict[str, Any], tuple[str, ...]], bool]

    # --- compress ---------------------------------------------------------------------

    def _compress(self, request: Request) -> Job:
        args = request.args
        version = self.registry.resolve(args["model"], args["version"])
        if bool(args["recipe"]) == bool(args["search"]):
            raise KernelError(ErrorCode.BAD_REQUEST, "compress: give a recipe or search "
                              "(not both)")
        grid = SEARCH_GRID if args["search"] else [args["recipe"]]
        recipes = [self.ext.compression_steps.resolve(recipe) for recipe in grid]
        _check_classifier(version)
        data = self._evaluation_data(version, args, "compress")
        name = check_name(args["name"] or version.model)
        self._trainers()
        job = self._admit(request, base=str(version.path), parent=version.ref, recipes=recipes,
                          dataset=data, output_name=name,
                          train_limit=int(version.recipe.get("limit") or 0))
        if job.args["seed"] is None:  # the parent's split: its validation rows are unseen
            job.args["seed"] = int(version.recipe.get("seed") or 0)
        folder = self.config.home / "jobs" / str(job.id)
        job.args.update(output=str(folder / "output"), workdir=str(folder / "work"))
        return job

    def _evaluation_data(self, version: ModelVersion, args: dict[str, Any],
                         syscall: str) -> dict[str, str]:
        """--data/--path if given, else the data the version (or its training) recorded."""
        if args["data"] or args["path"]:
            return self._data_spec(args)
        recorded = version.recipe.get("data")
        if not recorded:
            raise KernelError(ErrorCode.BAD_REQUEST,
                              f"{syscall}: {version.ref} has no evaluation data for the quality "
                              "gate (it was not fine-tuned by llmos train); pass data (a bundled "
                              "dataset) or path (CSV/JSONL)")
        return dict(recorded)

    def _compress_task(self, job: Job, host: DeviceHost) -> Task:
        job.args["host"] = host.name
        spec = {"base": job.args["base"], "recipes": job.args["recipes"], "data": job.args["dataset"],
                "output": job.args["output"], "workdir": job.args["workdir"],
                "max_drop": job.args["max_drop"], "seed": job.args["seed"],
                "max_tokens": job.args["max_tokens"], "eval_limit": job.args["eval_limit"],
                "train_limit": job.args["train_limit"]}
        return Task("compress", {"job": str(job.id), "spec": spec,
                                 "seconds": job.args["quantum"]}, [job])

    def _on_compressed(self, task: Task, body: dict[str, Any], jobs: list[Job]) -> None:
        """A quantum finished: publish progress, requeue, or make the version."""
        progress = body["progress"]
        for job in jobs:
            if self._next_quantum(job, progress, ("report", "outputs")):
                continue
            try:
                result = self._register_results(job, progress["report"], progress["outputs"])
            except KernelError as exc:  # e.g. a full disk; the job's folder goes as it ends
                self._fail(job, JobState.FAILED, exc.code, exc.message)
                continue
            self._finish(job, result)
            shutil.rmtree(Path(job.args["output"]).parent, ignore_errors=True)

    def _register_results(self, job: Job, report: dict[str, Any],
                          outputs: dict[str, str]) -> dict[str, Any]:
        """Import each kept candidate as a version; the reply (flat for one recipe)."""
        models: list[str | None] = []
        for number, entry in enumerate(report["candidates"]):
            if str(number) not in outputs:
                models.append(None)
                continue
            steps = job.args["recipes"][number]
            version, _ = self.registry.import_folder(
                job.args["output_name"], Path(outputs[str(number)]),
                recipe={"op": "compress", "steps": [{"step": s["step"], **s["params"]}
                                                     for s in steps],
                        "data": job.args["dataset"], "seed": job.args["seed"],
                        "limit": job.args["train_limit"],
                        "max_drop": job.args["max_drop"], "drivers": entry["result"]["drivers"]},
                parent=job.args["parent"],
                metrics={"compression": {"parent": report["parent"], **entry}}, move=True)
            models.append(version.ref)
        if not job.args["search"]:
            return {"model": models[0], "parent": job.args["parent"],
                    "servable": models[0] is not None,
                    "report": {"parent": report["parent"], **report["candidates"][0]}}
        return {"models": models, "front": report["front"], "parent": job.args["parent"],
                "report": report}

    def _work_folder_ended(self, job: Job, state: JobState) -> None:
        """A compress or update job that did not finish leaves nothing: its folder goes."""
        if state is not JobState.DONE and job.args.get("output"):
            shutil.rmtree(Path(job.args["output"]).parent, ignore_errors=True)

    # --- promote ----------------------------------------------------------------------

    def _promote(self, request: Request) -> Job | dict[str, Any]:
        return self._swap(request, self.registry.resolve(request.args["model"],
                                                         request.args["version"]))

    def _swap(self, request: Request, new: ModelVersion,
              rollback: bool = False) -> Job | dict[str, Any]:
        """Serve ``new`` instead of the serving version: at once if nothing needs loading,
        else through a job that loads it first. A ``rollback`` pops the serving history
        instead of pushing onto it."""
        current = self.registry.resolve(new.model)
        if current.version == new.version:
            return {"model": new.ref, "previous": current.ref, "devices": []}
        hosts = list(self._hosts().values())
        serving = [h for h in hosts if current.ref in h.wanted]
        if not serving:  # nothing loaded to swap: only the pointer moves
            self._serve(new, rollback)
            return {"model": new.ref, "previous": current.ref, "devices": []}
        allowed = drivers_of(new)
        targets = [h for h in serving if allowed is None or h.spec.name in allowed]
        targets = targets or serving_hosts(new, hosts)
        todo = [h for h in targets if new.ref not in h.wanted]
        if not todo:  # already loaded there: switch now
            self._serve(new, rollback)
            self._retiring.add(current.ref)
            self._retire()
            return {**self._placements(new.ref, targets), "previous": current.ref}
        return self._admit(request, handle=new.ref, path=str(new.path), previous=current.ref,
                           memory=self._check_memory(new, todo) if todo else 0,
                           precision="f32", options={"precision": "f32"},  # as load's
                           targets=[h.name for h in todo], tune=[],  # swap fast
                           done=[h.name for h in targets if h not in todo], rollback=rollback)

    def _serve(self, version: ModelVersion, rollback: bool) -> None:
        if rollback:
            self.registry.pop_serving(version.model)
        else:
            self.registry.set_serving(version.model, version.version)

    def _promoted(self, job: Job) -> None:
        """The new version is loaded: switch serving to it, retire the old one. If the
        switch cannot be written (a full disk), the job fails and the old version serves on."""
        name, _, number = job.args["handle"].rpartition(":")
        try:
            self._serve(self.registry.resolve(name, int(number)), job.args["rollback"])
        except KernelError as exc:
            self._fail(job, JobState.FAILED, exc.code, exc.message)
            return
        self._retiring.add(job.args["previous"])
        hosts = self._hosts()
        self._finish(job, {**self._placements(job.args["handle"],
                                              [hosts[n] for n in job.args["done"]]),
                           "previous": job.args["previous"]})
        self._retire()

    def _retire(self) -> None:
        """Unload retired versions that no unfinished job was routed to."""
        busy = {job.args.get("handle") for job in self.active.values()}
        assert self.devices is not None
        for handle in sorted(self._retiring - busy):
            self._retiring.discard(handle)
            for host in self._hosts().values():
                if handle in host.wanted:
                    self.devices.submit(host, Task("unload", {"handle": handle}))


def _check_classifier(version: ModelVersion) -> None:
    """BAD_REQUEST unless the version's config names a sequence classifier."""
    try:
        config = json.loads((version.path / "config.json").read_text())
    except (OSError, ValueError):
        raise KernelError(ErrorCode.BAD_REQUEST, f"{version.ref} has no readable config.json") from None
    if not any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        raise KernelError(ErrorCode.BAD_REQUEST,
                          f"compress: {version.ref} is not a classifier; compression is gated on "
                          "classification accuracy, so fine-tune it first (llmos train)")
