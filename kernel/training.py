"""Training syscalls: ``train`` (fine-tune a classifier as a time-sliced job), ``evaluate``,
``datasets``; the journal that lets a restarted kernel resume training.

A train job runs in **quanta**: each
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
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from llmos.contract.hostwire import TaskOp
from llmos.contract.protocol import ErrorCode, KernelError, encode_event

from . import datasets
from .devices import DeviceHost, HostState, Task
from .jobs import Job, JobState, continue_ids_after
from .kinds import Core, Handler, JobKind, Request
from .registry import ModelVersion, check_name

if TYPE_CHECKING:
    from .parallel import Parallel
    from .scheduler import Batch

log = logging.getLogger(__name__)

#: What a resumed train job takes from the job it continues (its data, hyper-parameters
#: and folders); the rest (quantum, priority, parallel plan) comes from the new request.
_RESUMED = ("model", "version", "data", "path", "name", "epochs", "batch_size", "learning_rate",
            "seed", "max_tokens", "limit", "base", "parent", "dataset", "output_name",
            "checkpoint", "output")


class Training(JobKind):
    """``train`` and ``evaluate`` jobs, ``datasets``; and what every time-sliced session
    (train, compress, update) shares: trainer hosts, data specs, quanta, the end."""

    def __init__(self, core: Core, parallel: Parallel) -> None:
        super().__init__(core)
        self.parallel = parallel

    def handlers(self) -> dict[str, Handler]:
        return {"datasets": self._datasets, "train": self._train, "evaluate": self._evaluate}

    def background(self, job: Job) -> bool:
        return job.syscall == "train"

    def candidates(self, job: Job) -> list[str]:
        if job.args.get("host"):
            return [job.args["host"]]  # the host that holds the session
        return [h.name for h in self.core.hosts().values() if h.spec.trains]

    def on_end(self, job: Job, state: JobState) -> None:
        if job.syscall == "train":
            self._journal(job, state)
            self.end_session(job, state)

    def end_session(self, job: Job, state: JobState) -> None:
        """A time-sliced job ended: unless it finished, its host drops the session."""
        host = self.core.hosts().get(job.args.get("host", ""))
        if state is not JobState.DONE and host is not None and host.state is HostState.READY:
            self.core.devices.submit(host, Task(TaskOp.FORGET, {"job": str(job.id)}))

    def _datasets(self, request: Request) -> dict[str, Any]:
        return {"datasets": datasets.bundled()}

    @staticmethod
    def data_spec(args: dict[str, Any]) -> dict[str, str]:
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

    def evaluation_data(self, version: ModelVersion, args: dict[str, Any],
                         syscall: str) -> dict[str, str]:
        """--data/--path if given, else the data the version (or its training) recorded."""
        if args["data"] or args["path"]:
            return self.data_spec(args)
        recorded = version.recipe.get("data")
        if not recorded:
            raise KernelError(ErrorCode.BAD_REQUEST,
                              f"{syscall}: {version.ref} has no evaluation data for the quality "
                              "gate (it was not fine-tuned by llmos train); pass data (a bundled "
                              "dataset) or path (CSV/JSONL)")
        return dict(recorded)

    def trainers(self) -> list[str]:
        hosts = [h for h in self.core.hosts().values()
                 if h.spec.trains and h.state is not HostState.FAILED]
        if not hosts:
            raise KernelError(ErrorCode.DEVICE_FAILED, "no device here can train "
                              "(start a kernel with a torch device)")
        return [h.name for h in hosts]

    def _train(self, request: Request) -> Job:
        plan = self.parallel.plan("train", request.args)
        if plan.ddp():  # NOT_FOUND now, not at dispatch, when no plugin runs DDP
            self.core.ext.sessions.get("ddp")
        if request.args["resume"]:
            return self._resume(request, plan.ddp())
        version = self.core.registry.resolve(request.args["model"], request.args["version"])
        data = self.data_spec(request.args)
        name = check_name(request.args["name"] or version.model)
        self.trainers()
        job = self.core.admit(request, base=str(version.path), parent=version.ref, dataset=data,
                          output_name=name, ddp=plan.ddp())
        folder = self.core.config.home / "jobs" / str(job.id)
        job.args.update(checkpoint=str(folder / "checkpoint"), output=str(folder / "output"))
        self.journal_new(job)
        return job

    def _resume(self, request: Request, ddp: dict[str, Any] | None) -> Job:
        """A new job that continues a failed, cancelled or timed-out train job from its
        last checkpoint, with its arguments (and this request's parallel plan)."""
        old_id = request.args["resume"]
        found = self.core.registry.journal_get(old_id)
        if found is None or found[0] != "train":
            raise KernelError(ErrorCode.NOT_FOUND, f"no train job {old_id} to resume")
        _, state, old = found
        if state not in ("FAILED", "CANCELLED", "TIMED_OUT"):
            raise KernelError(ErrorCode.BAD_REQUEST, f"train job {old_id} is {state}: only a "
                              "failed, cancelled or timed-out job can be resumed")
        if not (Path(old["checkpoint"]) / "state.json").exists():
            raise KernelError(ErrorCode.NOT_FOUND, f"train job {old_id} left no checkpoint")
        self.trainers()
        keep = {k: old[k] for k in _RESUMED if k in old}
        job = self.core.admit(request, **keep, ddp=ddp, resumed_from=old_id)
        self.journal_new(job)
        return job

    def withdraw(self, job: Job, error: KernelError) -> NoReturn:
        """Undo the admission of ``job``, whose preparation failed (its journal row or its
        files could not be written): it ends FAILED without a reply of its own, and
        ``error`` is raised for the handler to answer with."""
        job.reply_route = None
        self.core.fail(job, JobState.FAILED, error.code, error.message)
        raise error

    def _evaluate(self, request: Request) -> Job:
        """Score a classifier: a file's every row unless a split is named; a bundled
        dataset's test split by default."""
        version = self.core.registry.resolve(request.args["model"], request.args["version"])
        data = self.data_spec(request.args)
        split = request.args["split"] or (datasets.ALL if "path" in data else "test")
        self.trainers()
        return self.core.admit(request, path=str(version.path), handle=version.ref,
                               dataset=data, split=split)

    # --- scheduling and results -------------------------------------------------------

    def task(self, batch: Batch, host: DeviceHost) -> Task:
        job = batch.jobs[0]
        if job.syscall == "evaluate":
            return Task(TaskOp.EVALUATE, {"path": job.args["path"], "data": job.args["dataset"],
                                          "split": job.args["split"], "seed": job.args["seed"]},
                        [job])
        job.args["host"] = host.name
        spec = {"base": job.args["base"], "data": job.args["dataset"],
                "checkpoint": job.args["checkpoint"], "output": job.args["output"],
                "epochs": job.args["epochs"], "batch_size": job.args["batch_size"],
                "learning_rate": job.args["learning_rate"], "seed": job.args["seed"],
                "max_tokens": job.args["max_tokens"], "limit": job.args["limit"],
                "checkpoint_every": job.args["checkpoint_every"]}
        payload = {"job": str(job.id), "spec": spec, "seconds": job.args["quantum"]}
        if job.args.get("ddp"):
            spec["ddp"] = job.args["ddp"]
            payload["session"] = self.core.ext.sessions.get("ddp").qualname
        return Task(TaskOp.TRAIN, payload, [job])

    def on_done(self, host: DeviceHost, task: Task, body: dict[str, Any],
                buffers: list[bytes], live: list[Job]) -> None:
        """A quantum or an evaluation finished: publish progress, requeue, or finish."""
        if task.op == TaskOp.EVALUATE:
            for job in live:
                name, _, number = job.args["handle"].rpartition(":")
                key = f"{job.args['dataset'].get('name') or job.args['dataset']['path']}:" \
                      f"{job.args['split']}"
                try:
                    version = self.core.registry.resolve(name, int(number))
                    self.core.registry.add_metrics(version, key, body["metrics"])
                except KernelError as exc:
                    self.core.fail(job, JobState.FAILED, exc.code, exc.message)
                    continue
                self.core.finish(job, {"model": job.args["handle"], **body["metrics"]})
            return
        progress = body["progress"]
        for job in live:
            if self.next_quantum(job, progress, ("metrics", "output")):
                continue
            metrics = dict(progress["metrics"])
            training, warning = metrics.pop("training"), metrics.pop("warning")
            try:
                version, _ = self.core.registry.import_folder(
                    job.args["output_name"], Path(progress["output"]),
                    recipe={"op": "train", "data": job.args["dataset"],
                            "epochs": training["epochs"], "batch_size": training["batch_size"],
                            "learning_rate": training["learning_rate"], "seed": job.args["seed"],
                            "max_tokens": job.args["max_tokens"], "limit": job.args["limit"]},
                    parent=job.args["parent"], metrics=metrics, move=True)
            except KernelError as exc:  # e.g. a full disk: the checkpoint stays for a resume
                shutil.rmtree(progress["output"], ignore_errors=True)
                self.core.fail(job, JobState.FAILED, exc.code, exc.message)
                continue
            shutil.rmtree(Path(job.args["checkpoint"]).parent, ignore_errors=True)
            if warning:
                log.warning("train job %d: %s", job.id, warning)
            self.core.finish(job, {"model": version.ref, "parent": job.args["parent"],
                                   "metrics": metrics, "labels": progress["labels"],
                                   "steps": progress["step"], "training": training,
                                   "warning": warning})

    def next_quantum(self, job: Job, progress: dict[str, Any], results: tuple[str, ...]) -> bool:
        """A time-sliced job (train, compress, update) finished a quantum: record and
        publish its progress (without the ``results`` keys); if it is not done, queue it
        again (inference queued meanwhile runs first) and return True."""
        job.progress = {k: v for k, v in progress.items() if k not in results}
        if job.wants_events and job.reply_route:
            identity, msg_id = job.reply_route
            self.core.send(identity, encode_event(msg_id, job.syscall, "progress", job.progress))
        if progress["done"]:
            return False
        job.transition(JobState.QUEUED)
        job.attempts = 0
        self.core.scheduler.push(job)
        return True

    # --- the journal ------------------------------------------------------------------

    def journal_new(self, job: Job) -> None:
        """Journal a job just admitted; if that cannot be written, withdraw it (a train job
        that would not survive a restart is refused, not run)."""
        try:
            self.core.registry.journal_put(job.id, job.syscall, job.owner, job.priority, job.args,
                                      str(job.state))
        except KernelError as exc:
            self.withdraw(job, exc)

    def _journal(self, job: Job, state: JobState) -> None:
        """Journal the state a job ended in. If it cannot be written now, the job ends all
        the same: the row waits in the registry's backlog for the next journal write."""
        try:
            self.core.registry.journal_put(job.id, job.syscall, job.owner, job.priority, job.args,
                                      str(state))
        except KernelError as exc:
            log.warning("job %d ended %s; the journal will record it later: %s",
                        job.id, state, exc.message)

    def resume_journalled(self) -> None:
        """Queue again the train jobs a previous kernel left unfinished."""
        continue_ids_after(self.core.registry.journal_last_id())
        for job_id, syscall, owner, priority, args in self.core.registry.journal_unfinished():
            job = Job(syscall, owner, args, priority=priority, id=job_id, kind=self)
            job.args.pop("host", None)  # that host is gone; any trainer resumes the checkpoint
            self.core.adopt(job)
            log.info("resuming train job %d from %s", job.id, args.get("checkpoint"))


class SessionKind(JobKind):
    """A kind whose jobs are plugin sessions in quanta on a trainer host (compress,
    update): in the background of that hardware, and leaving nothing unless they finish."""

    def __init__(self, core: Core, training: Training) -> None:
        super().__init__(core)
        self.training = training

    def background(self, job: Job) -> bool:
        return True

    def candidates(self, job: Job) -> list[str]:
        return self.training.candidates(job)

    def on_end(self, job: Job, state: JobState) -> None:
        """A job that did not finish leaves nothing: its folder goes."""
        if state is not JobState.DONE and job.args.get("output"):
            shutil.rmtree(Path(job.args["output"]).parent, ignore_errors=True)
        self.training.end_session(job, state)
