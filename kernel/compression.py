"""The ``compress`` syscall: a recipe as a time-sliced job (the version swap that serves
its result is kernel/swap.py).

A compress job runs where training runs: quanta of ``compress`` tasks on a host whose
driver trains (the torch host), in the background of that hardware, with progress events
between quanta (see
:mod:`llmos.plugins.compression.session`). The recipe is checked against the steps plugins
registered before any job exists, so a bad recipe writes nothing. When the last quantum
ends, a result that passed the quality gate becomes a new version (parent, recipe, the
report as metrics); one that failed leaves no version and the reply says why.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmos.contract.hostwire import TaskOp
from llmos.contract.protocol import ErrorCode, KernelError

from .devices import DeviceHost, Task
from .jobs import Job, JobState
from .kinds import Handler, Request
from .registry import ModelVersion, check_name
from .training import SessionKind

if TYPE_CHECKING:
    from .scheduler import Batch


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


class Compression(SessionKind):
    """``compress`` jobs: a recipe (or a grid of them) in quanta, then new versions."""

    def handlers(self) -> dict[str, Handler]:
        return {"compress": self._compress}

    def _compress(self, request: Request) -> Job:
        args = request.args
        version = self.core.registry.resolve(args["model"], args["version"])
        if bool(args["recipe"]) == bool(args["search"]):
            raise KernelError(ErrorCode.BAD_REQUEST, "compress: give a recipe or search "
                              "(not both)")
        grid = SEARCH_GRID if args["search"] else [args["recipe"]]
        recipes = [self.core.ext.compression_steps.resolve(recipe) for recipe in grid]
        _check_classifier(version)
        data = self.training.evaluation_data(version, args, "compress")
        name = check_name(args["name"] or version.model)
        self.training.trainers()
        session = self.core.ext.sessions.get("compress").qualname  # NOT_FOUND without a plugin
        job = self.core.admit(request, base=str(version.path), parent=version.ref, recipes=recipes,
                              session=session, dataset=data, output_name=name,
                              train_limit=int(version.recipe.get("limit") or 0))
        if job.args["seed"] is None:  # the parent's split: its validation rows are unseen
            job.args["seed"] = int(version.recipe.get("seed") or 0)
        folder = self.core.config.home / "jobs" / str(job.id)
        job.args.update(output=str(folder / "output"), workdir=str(folder / "work"))
        return job

    def task(self, batch: Batch, host: DeviceHost) -> Task:
        job = batch.jobs[0]
        job.args["host"] = host.name
        spec = {"base": job.args["base"], "recipes": job.args["recipes"], "data": job.args["dataset"],
                "output": job.args["output"], "workdir": job.args["workdir"],
                "max_drop": job.args["max_drop"], "seed": job.args["seed"],
                "max_tokens": job.args["max_tokens"], "eval_limit": job.args["eval_limit"],
                "train_limit": job.args["train_limit"]}
        return Task(TaskOp.COMPRESS, {"job": str(job.id), "session": job.args["session"],
                                      "spec": spec, "seconds": job.args["quantum"]}, [job])

    def on_done(self, host: DeviceHost, task: Task, body: dict[str, Any],
                buffers: list[bytes], live: list[Job]) -> None:
        """A quantum finished: publish progress, requeue, or make the version."""
        progress = body["progress"]
        for job in live:
            if self.training.next_quantum(job, progress, ("report", "outputs")):
                continue
            try:
                result = self._register_results(job, progress["report"], progress["outputs"])
            except KernelError as exc:  # e.g. a full disk; the job's folder goes as it ends
                self.core.fail(job, JobState.FAILED, exc.code, exc.message)
                continue
            self.core.finish(job, result)
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
            version, _ = self.core.registry.import_folder(
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
