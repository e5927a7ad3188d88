"""The ``infer`` syscall: classify and embed batches, dynamically batched per model.

Queued ``infer`` jobs for one model and task leave the queue together as one ``run`` task
(up to the batching knobs of the driver that would run them fastest) for the cheapest free
host that has the model loaded; a pipeline's batches enter at its first stage and travel
stage to stage (kernel/parallel.py). Each job's rows of the outputs go back to its client,
and each finished job feeds its version's monitor (kernel/learning.py).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from llmos.contract.hostwire import TaskOp
from llmos.contract.protocol import ErrorCode, KernelError
from llmos.contract.states import JobState
from llmos.contract.syscalls import check_inputs

from .devices import DeviceHost, Task
from .jobs import Job
from .kinds import Core, Handler, JobKind, Request, loaded_version
from .outputs import predictions, split_rows
from .placement import batch_shape
from .scheduler import Batch, BatchingConfig

if TYPE_CHECKING:
    from .learning import Learning
    from .parallel import Parallel


#: What a task needs, for the error when the model cannot run it.
_NEEDS = {"embed": "embed needs an encoder model such as minilm",
          "classify": "classify needs a model with a classification head"}


class Inference(JobKind):
    """``infer`` jobs: batching, placement by cost, outputs split per job."""

    def __init__(self, core: Core, learning: Learning, parallel: Parallel) -> None:
        super().__init__(core)
        self.learning, self.parallel = learning, parallel

    def handlers(self) -> dict[str, Handler]:
        return {"infer": self._infer}

    def _infer(self, request: Request) -> Job:
        check_inputs(request.args["inputs"])
        task = request.args["task"]
        version = loaded_version(self.core, request, task, _NEEDS[task])
        return self.core.admit(request, handle=version.ref)

    # --- scheduling -----------------------------------------------------------------------

    def batch_key(self, job: Job) -> Hashable:
        return (job.args["handle"], job.args["task"])

    def candidates(self, job: Job) -> list[str]:
        handle = job.args["handle"]  # a pipeline's batches enter at its first stage
        return [h.name for h in self.core.hosts().values()
                if handle in h.loaded and h.role.get("stage", 1) == 1
                and self.parallel.pipeline_loaded(h, handle)]

    def batching(self, job: Job) -> BatchingConfig:
        """The knobs of the driver that would run this job fastest (kernel defaults if none)."""
        hosts = self.core.hosts()
        candidates = [hosts[name] for name in self.candidates(job) if name in hosts]
        if not candidates:
            return self.core.batching
        best = min(candidates, key=lambda host: self.cost([job], host.name))
        return best.spec.batching or self.core.batching

    def cost(self, jobs: list[Job], device: str) -> float:
        """Predicted ms of the hardware a batch takes on a device: its timed run divided by
        the host's streams, which run beside it."""
        host = self.core.hosts().get(device)
        streams = host.streams if host is not None else 1
        return self.core.costs.predict(jobs[0].args["handle"], device, *batch_shape(jobs)) / streams

    def task(self, batch: Batch, host: DeviceHost) -> Task:
        first = batch.jobs[0]
        inputs = [text for job in batch.jobs for text in job.args["inputs"]]
        return Task(TaskOp.RUN, {"handle": first.args["handle"], "kind": first.args["task"],
                                 "inputs": inputs}, batch.jobs)

    def orphaned(self, job: Job) -> KernelError | None:
        handle = job.args["handle"]
        if any(handle in h.wanted or handle in h.loaded for h in self.core.hosts().values()):
            return None
        return KernelError(ErrorCode.NOT_FOUND, f"{handle} is no longer loaded on any device")

    # --- results --------------------------------------------------------------------------

    def on_done(self, host: DeviceHost, task: Task, body: dict[str, Any],
                buffers: list[bytes], live: list[Job]) -> None:
        if host.role.get("next"):
            self.parallel.forward_stage(host, task, body, buffers, live)
        else:
            self._split_outputs(host, task, body, buffers)

    def _split_outputs(self, host: DeviceHost, task: Task, body: dict[str, Any],
                       buffers: list[bytes]) -> None:
        """Each running job's rows of the batch's outputs (byte ranges of the host's frames,
        kernel/outputs.py) and, for classify, its predictions (the host's top classes)."""
        counts = [len(job.args["inputs"]) for job in task.jobs]
        rows = split_rows(body["arrays"], buffers, counts)
        classify = task.payload["kind"] == "classify"
        labels = host.loaded.get(task.payload["handle"], {}).get("labels", []) if classify else []
        top = predictions(body.get("top"), labels, counts) if classify else None
        for index, job in enumerate(task.jobs):
            if job.state is not JobState.RUNNING:
                continue
            refs, frames = rows[index]
            result: dict[str, Any] = {"model": job.args["handle"], "task": job.args["task"],
                                      "tokens": job.tokens, **refs}
            if top is not None:
                result["labels"] = labels
                result["predictions"] = top[index]
            self.learning.observe(job, [(p["label"], p["score"]) for p in top[index]] if top else [])
            self.core.finish(job, result, frames)

    def on_end(self, job: Job, state: JobState) -> None:
        """A failed or expired job counts as an error of its version (not a cancelled one)."""
        if state in (JobState.FAILED, JobState.TIMED_OUT) and "handle" in job.args:
            self.learning.monitor(job.args["handle"]).record_error()
