"""Training syscalls: ``train`` (fine-tune a classifier as a time-sliced job), ``evaluate``,
``datasets``; the journal that lets a restarted kernel resume training.

A mixin of :class:`~llmos.kernel.core.KernelCore`. A train job runs in **quanta**: each
dispatch sends one ``train`` task (about ``quantum`` seconds of optimizer steps) to a host
whose driver trains; the host checkpoints at the end of every quantum and the job goes
back to QUEUED, so inference queued meanwhile runs first (train jobs default to nice 10)
and ``renice`` changes the job's share. The job sticks to the host that holds its session.
When the last quantum is done, the saved model becomes a new registry version with its
parent, recipe, data and metrics. Train jobs are journalled in SQLite: a kernel started
after a crash re-queues them, and the host resumes from the last checkpoint.

A write that fails (a full disk) fails only its job, with the error naming what could not
be written: the journal row of a new job (the job is withdrawn before it runs), a
checkpoint or the trained model (in the host, which removes the partial files), the new
version. A job whose final state cannot be journalled ends all the same; the row waits in
memory and is written with the next journal write (:meth:`Registry.journal_put`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from llmos.contract.protocol import ErrorCode, KernelError, encode_event

from . import datasets
from .devices import DeviceHost, HostState, Task
from .jobs import Job, JobState, continue_ids_after
from .mixin import CoreServices
from .registry import check_name

if TYPE_CHECKING:
    from .core import Request

log = logging.getLogger(__name__)

#: What a resumed train job takes from the job it continues (its data, hyper-parameters
#: and folders); the rest (quantum, priority, parallel plan) comes from the new request.
_RESUMED = ("model", "version", "data", "path", "name", "epochs", "batch_size", "learning_rate",
            "seed", "max_tokens", "limit", "base", "parent", "dataset", "output_name",
            "checkpoint", "output")


class TrainingSyscalls(CoreServices):
    """Handlers and completion logic for training and evaluation jobs."""

    per_owner: Any
    #: From ParallelPlacement (kernel/parallel.py).
    _plan: Callable[..., Any]

    # --- handlers ---------------------------------------------------------------------

    def _datasets(self, request: Request) -> dict[str, Any]:
        return {"datasets": datasets.bundled()}

    @staticmethod
    def _data_spec(args: dict[str, Any]) -> dict[str, str]:
        """``{"name": ...}`` or ``{"path": ...}``, checked cheaply (contents: in the host)."""
        name, path = args["data"], args["path"]
        if bool(name) == bool(path):
            raise KernelError(ErrorCode.BAD_REQUEST, "give exactly one of data (a bundled "
                              f"dataset: {', '.join(datasets.BUNDLED)}) or path (CSV/JSONL)")
        if name:
            if name not in datasets.BUNDLED:
                raise KernelError(ErrorCode.NOT_FOUND, f"unknown dataset {name!r} "
                                  f"(bundled: {', '.join(datasets.BUNDLED)})")
            return {"name": name}
        file = Path(path).expanduser().resolve()
        if not file.is_file():
            raise KernelError(ErrorCode.NOT_FOUND, f"data file {str(file)!r} does not exist")
        return {"path": str(file)}

    def _trainers(self) -> list[str]:
        hosts = [h for h in self._hosts().values()
                 if h.spec.trains and h.state is not HostState.FAILED]
        if not hosts:
            raise KernelError(ErrorCode.DEVICE_FAILED, "no device here can train "
                              "(start a kernel with a torch device)")
        return [h.name for h in hosts]

    def _train(self, request: Request) -> Job:
        plan = self._plan("train", request.args)
        if request.args["resume"]:
            return self._resume(request, plan.ddp())
        version = self.registry.resolve(request.args["model"], request.args["version"])
        data = self._data_spec(request.args)
        name = check_name(request.args["name"] or version.model)
        self._trainers()
        job = self._admit(request, base=str(version.path), parent=version.ref, dataset=data,
                          output_name=name, ddp=plan.ddp())
        folder = self.config.home / "jobs" / str(job.id)
        job.args.update(checkpoint=str(folder / "checkpoint"), output=str(folder / "output"))
        self._journal_new(job)
        return job

    def _resume(self, request: Request, ddp: dict[str, Any] | None) -> Job:
        """A new job that continues a failed, cancelled or timed-out train job from its
        last checkpoint, with its arguments (and this request's parallel plan)."""
        old_id = request.args["resume"]
        found = self.registry.journal_get(old_id)
        if found is None or found[0] != "train":
            raise KernelError(ErrorCode.NOT_FOUND, f"no train job {old_id} to resume")
        _, state, old = found
        if state not in ("FAILED", "CANCELLED", "TIMED_OUT"):
            raise KernelError(ErrorCode.BAD_REQUEST, f"train job {old_id} is {state}: only a "
                              "failed, cancelled or timed-out job can be resumed")
        if not (Path(old["checkpoint"]) / "state.json").exists():
            raise KernelError(ErrorCode.NOT_FOUND, f"train job {old_id} left no checkpoint")
        self._trainers()
        keep = {k: old[k] for k in _RESUMED if k in old}
        job = self._admit(request, **keep, ddp=ddp, resumed_from=old_id)
        self._journal_new(job)
        return job

    def _withdraw(self, job: Job, error: KernelError) -> NoReturn:
        """Undo the admission of ``job``, whose preparation failed (its journal row or its
        files could not be written): it ends FAILED without a reply of its own, and
        ``error`` is raised for the handler to answer with."""
        job.reply_route = None
        self._fail(job, JobState.FAILED, error.code, error.message)
        raise error

    def _evaluate(self, request: Request) -> Job:
        version = self.registry.resolve(request.args["model"], request.args["version"])
        data = self._data_spec(request.args)
        self._trainers()
        return self._admit(request, path=str(version.path), handle=version.ref, dataset=data)

    # --- scheduling and results -------------------------------------------------------

    def _training_candidates(self, job: Job) -> list[str]:
        if job.args.get("host"):
            return [job.args["host"]]  # the host that holds the session
        return [h.name for h in self._hosts().values() if h.spec.trains]

    def _training_task(self, job: Job, host: DeviceHost) -> Task:
        if job.syscall == "evaluate":
            return Task("evaluate", {"path": job.args["path"], "data": job.args["dataset"],
                                     "split": job.args["split"], "seed": job.args["seed"]}, [job])
        job.args["host"] = host.name
        spec = {"base": job.args["base"], "data": job.args["dataset"],
                "checkpoint": job.args["checkpoint"], "output": job.args["output"],
                "epochs": job.args["epochs"], "batch_size": job.args["batch_size"],
                "learning_rate": job.args["learning_rate"], "seed": job.args["seed"],
                "max_tokens": job.args["max_tokens"], "limit": job.args["limit"],
                "checkpoint_every": job.args["checkpoint_every"]}
        if job.args.get("ddp"):
            spec["ddp"] = job.args["ddp"]
        return Task("train", {"job": str(job.id), "spec": spec,
                              "seconds": job.args["quantum"]}, [job])

    def _on_trained(self, host: DeviceHost, task: Task, body: dict[str, Any],
                    jobs: list[Job]) -> None:
        """A quantum or an evaluation finished: publish progress, requeue, or finish."""
        if task.op == "evaluate":
            for job in jobs:
                name, _, number = job.args["handle"].rpartition(":")
                key = f"{job.args['dataset'].get('name') or job.args['dataset']['path']}:" \
                      f"{job.args['split']}"
                try:
                    self.registry.add_metrics(self.registry.resolve(name, int(number)), key,
                                              body["metrics"])
                except KernelError as exc:
                    self._fail(job, JobState.FAILED, exc.code, exc.message)
                    continue
                self._finish(job, {"model": job.args["handle"], **body["metrics"]})
            return
        progress = body["progress"]
        for job in jobs:
            if self._next_quantum(job, progress, ("metrics", "output")):
                continue
            try:
                version, _ = self.registry.import_folder(
                    job.args["output_name"], Path(progress["output"]),
                    recipe={"op": "train", "data": job.args["dataset"],
                            "epochs": job.args["epochs"], "batch_size": job.args["batch_size"],
                            "learning_rate": job.args["learning_rate"], "seed": job.args["seed"],
                            "max_tokens": job.args["max_tokens"], "limit": job.args["limit"]},
                    parent=job.args["parent"], metrics=progress["metrics"], move=True)
            except KernelError as exc:  # e.g. a full disk: the checkpoint stays for a resume
                shutil.rmtree(progress["output"], ignore_errors=True)
                self._fail(job, JobState.FAILED, exc.code, exc.message)
                continue
            shutil.rmtree(Path(job.args["checkpoint"]).parent, ignore_errors=True)
            self._finish(job, {"model": version.ref, "parent": job.args["parent"],
                               "metrics": progress["metrics"], "labels": progress["labels"],
                               "steps": progress["step"]})

    def _next_quantum(self, job: Job, progress: dict[str, Any], results: tuple[str, ...]) -> bool:
        """A time-sliced job (train, compress, update) finished a quantum: record and
        publish its progress (without the ``results`` keys); if it is not done, queue it
        again (inference queued meanwhile runs first) and return True."""
        job.progress = {k: v for k, v in progress.items() if k not in results}
        if job.wants_events and job.reply_route:
            identity, msg_id = job.reply_route
            self._send(identity, encode_event(msg_id, job.syscall, "progress", job.progress))
        if progress["done"]:
            return False
        job.transition(JobState.QUEUED)
        job.attempts = 0
        self.scheduler.push(job)
        return True

    # --- the journal ------------------------------------------------------------------

    def _journal_new(self, job: Job) -> None:
        """Journal a job just admitted; if that cannot be written, withdraw it (a train job
        that would not survive a restart is refused, not run)."""
        try:
            self.registry.journal_put(job.id, job.syscall, job.owner, job.priority, job.args,
                                      str(job.state))
        except KernelError as exc:
            self._withdraw(job, exc)

    def _journal(self, job: Job, state: JobState) -> None:
        """Journal the state a job ended in. If it cannot be written now, the job ends all
        the same: the row waits in the registry's backlog for the next journal write."""
        try:
            self.registry.journal_put(job.id, job.syscall, job.owner, job.priority, job.args,
                                      str(state))
        except KernelError as exc:
            log.warning("job %d ended %s; the journal will record it later: %s",
                        job.id, state, exc.message)

    def _resume_journalled(self) -> None:
        """Queue again the train jobs a previous kernel left unfinished."""
        continue_ids_after(self.registry.journal_last_id())
        for job_id, syscall, owner, priority, args in self.registry.journal_unfinished():
            job = Job(syscall, owner, args, priority=priority, id=job_id)
            job.args.pop("host", None)  # that host is gone; any trainer resumes the checkpoint
            self.active[job.id] = job
            self.per_owner[owner] += 1
            self.scheduler.push(job)
            log.info("resuming train job %d from %s", job.id, args.get("checkpoint"))
