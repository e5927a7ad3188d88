"""Incremental learning syscalls: ``update`` (learn from the feedback buffer) and ``rollback``.

``update`` turns a classifier's feedback
buffer into a **candidate version**: the examples are split once, in the kernel, into a
training part and a held-out part (files in the job's folder); an update method registered
by a plugin (``llmos_register_update_methods``: lora, online, finetune) trains in the
driver host that learns, in quanta at a low priority like ``train``, replaying rows of the
version's old training data and distilling from the current version; then the host
measures current and candidate on the held-out feedback (the new domain) and on the old
data's validation rows (the old domain). The candidate becomes a version either way, with
the report as its metrics; it is **promoted** (the zero-downtime swap of ``promote``) only
when the new-domain accuracy improves and the old-domain accuracy falls by at most
``max_drop`` points; otherwise it stays in the registry as rejected, with the reason.

``rollback MODEL`` serves again the version that served before the current one, through
the same swap (kernel/swap.py). A kernel started with ``--update-after N`` also starts an update on its own
once N examples arrived since the last update of the model, or when a drift alert is
raised on a version whose model has at least :data:`MIN_EXAMPLES` new examples.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmos.contract.hostwire import TaskOp
from llmos.contract.protocol import ErrorCode, KernelError

from .devices import DeviceHost, Task
from .feedback import Example, FeedbackStore
from .jobs import Job, JobState
from .kinds import Core, Handler, Request, internal_request
from .learning import classifier_labels
from .registry import ModelVersion, writing
from .training import SessionKind

if TYPE_CHECKING:
    from .scheduler import Batch
    from .swap import VersionSwap
    from .training import Training

log = logging.getLogger(__name__)

#: Fewest feedback examples an update needs (some to train on, some held out).
MIN_EXAMPLES = 10
#: Most feedback examples one update reads.
MAX_EXAMPLES = 100_000


def split_examples(examples: list[Example], holdout: float, seed: int
                   ) -> tuple[list[Example], list[Example]]:
    """(train, held-out): a seeded shuffle; at least 2 held out and 2 to train on."""
    order = list(examples)
    random.Random(seed).shuffle(order)
    held = min(len(order) - 2, max(2, round(holdout * len(order))))
    return order[held:], order[:held]


def write_examples(path: Path, examples: list[Example]) -> None:
    """Write ``examples`` as JSON lines; KernelError(INTERNAL) naming ``path`` (and no
    partial file) if that fails."""
    with writing(f"{len(examples)} feedback examples for the update", path, partial=path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as fh:
            for example in examples:
                fh.write(json.dumps({"text": example.text, "label": example.label}) + "\n")


class Update(SessionKind):
    """``update`` jobs: a candidate version from the feedback buffer, gated, promoted."""

    def __init__(self, core: Core, training: Training, swap: VersionSwap,
                 feedback: FeedbackStore) -> None:
        super().__init__(core, training)
        self.swap, self.feedback = swap, feedback

    def handlers(self) -> dict[str, Handler]:
        return {"update": self._update}

    def _update(self, request: Request) -> Job:
        args = request.args
        version = self.core.registry.resolve(args["model"], args["version"])
        labels = classifier_labels(version)
        method = self.core.ext.update_methods.resolve(args["method"], args["params"] or {})
        old_data = self.training.evaluation_data(version, args, "update")
        examples = self.feedback.examples(version.model, limit=MAX_EXAMPLES)
        if args["limit"]:
            examples = examples[-args["limit"]:]  # the most recent
        examples = [e for e in examples if e.label in labels]
        if len(examples) < MIN_EXAMPLES:
            raise KernelError(ErrorCode.BAD_REQUEST,
                              f"update: {version.model} has {len(examples)} usable feedback "
                              f"examples; it needs at least {MIN_EXAMPLES} (send them with "
                              f"llmos learn {version.model} --feedback FILE)")
        self.training.trainers()
        train, held = split_examples(examples, args["holdout"], args["seed"])
        session = self.core.ext.sessions.get("update").qualname  # NOT_FOUND without a plugin
        job = self.core.admit(request, base=str(version.path), parent=version.ref, method=method,
                              session=session, old_data=old_data,
                              old_limit=int(version.recipe.get("limit") or 0),
                              feedback={"first_id": examples[0].id, "last_id": examples[-1].id,
                                        "examples": len(examples), "train": len(train),
                                        "held_out": len(held)})
        folder = self.core.config.home / "jobs" / str(job.id)
        job.args.update(train_file=str(folder / "train.jsonl"),
                        holdout_file=str(folder / "holdout.jsonl"),
                        output=str(folder / "output"))
        try:  # a failure withdraws the job, and its folder goes (on_end)
            write_examples(folder / "train.jsonl", train)
            write_examples(folder / "holdout.jsonl", held)
        except KernelError as exc:
            self.training.withdraw(job, exc)
        return job

    def task(self, batch: Batch, host: DeviceHost) -> Task:
        job = batch.jobs[0]
        job.args["host"] = host.name
        a = job.args
        spec = {"base": a["base"], "method": a["method"], "train_file": a["train_file"],
                "holdout_file": a["holdout_file"], "old_data": a["old_data"],
                "old_limit": a["old_limit"], "replay": a["replay"], "distill": a["distill"],
                "max_drop": a["max_drop"], "seed": a["seed"], "max_tokens": a["max_tokens"],
                "eval_limit": a["eval_limit"], "output": a["output"]}
        return Task(TaskOp.UPDATE, {"job": str(job.id), "session": a["session"], "spec": spec,
                                    "seconds": a["quantum"]}, [job])

    def on_done(self, host: DeviceHost, task: Task, body: dict[str, Any],
                buffers: list[bytes], live: list[Job]) -> None:
        """A quantum finished: publish progress, requeue, or register the candidate."""
        progress = body["progress"]
        for job in live:
            if self.training.next_quantum(job, progress, ("report",)):
                continue
            try:
                result = self._register_candidate(job, progress["report"])
            except KernelError as exc:  # e.g. a full disk; the job's folder goes as it ends
                self.core.fail(job, JobState.FAILED, exc.code, exc.message)
                continue
            self.core.finish(job, result)
            shutil.rmtree(Path(job.args["output"]).parent, ignore_errors=True)

    def _register_candidate(self, job: Job, report: dict[str, Any]) -> dict[str, Any]:
        a = job.args
        name, _, number = a["parent"].rpartition(":")
        parent = self.core.registry.resolve(name, int(number))
        reference = parent.metrics.get("reference")
        version, _ = self.core.registry.import_folder(
            name, Path(a["output"]),
            recipe={"op": "learn", "method": a["method"]["method"],
                    "params": a["method"]["params"], "replay": a["replay"],
                    "distill": a["distill"], "max_drop": a["max_drop"], "seed": a["seed"],
                    "feedback": a["feedback"], "data": a["old_data"], "limit": a["old_limit"]},
            parent=a["parent"], move=True,
            metrics={"learning": report, **({"reference": reference} if reference else {})})
        result: dict[str, Any] = {"model": version.ref, "parent": a["parent"],
                                  "passed": report["gate"]["passed"],
                                  "reason": report["gate"]["reason"], "report": report,
                                  "promoted": False}
        if report["gate"]["passed"] and a["promote"]:
            swap = self._swap_internally(job.owner, version)
            result["promoted"] = True
            result["promote_job"] = swap.id if isinstance(swap, Job) else None
        return result

    def _swap_internally(self, owner: str, version: ModelVersion) -> Job | dict[str, Any]:
        """Promote ``version`` on behalf of ``owner`` with no client waiting for the reply."""
        outcome = self.swap.promote(internal_request(
            "promote", owner, {"model": version.model, "version": version.version}))
        if isinstance(outcome, Job):
            outcome.reply_route = None
        return outcome

    def maybe_update(self, version: ModelVersion, owner: str, on_alert: bool = False) -> None:
        """With ``--update-after N``: start an update of ``version``'s model once N examples
        arrived after the last update's, or on a drift alert once :data:`MIN_EXAMPLES` did
        (never while one is unfinished)."""
        every = MIN_EXAMPLES if on_alert else self.core.config.update_after
        if not self.core.config.update_after or any(
                j.kind is self and j.args["parent"].startswith(f"{version.model}:")
                for j in self.core.active.values()):
            return
        seen = max((int(v.recipe.get("feedback", {}).get("last_id", 0))
                    for v in self.core.registry.versions(version.model)), default=0)
        if len(self.feedback.examples(version.model, after=seen, limit=every)) < every:
            return
        try:
            job = self._update(internal_request("update", owner, {"model": version.model}))
        except KernelError as exc:  # e.g. no old data recorded: nothing to gate on
            log.warning("no automatic update of %s: %s", version.model, exc.message)
            return
        job.reply_route = None
        log.info("automatic update of %s: job %d (%s)", version.model, job.id,
                 "drift alert" if on_alert else f"{every} new examples")
