"""Learning and monitoring: ``learn`` (durable feedback) and per-model ``stats``.

``learn`` checks each example against
the model's own labels before anything is written; a batch with one bad example is refused
whole. The examples go to the :class:`~llmos.kernel.feedback.FeedbackStore`, on disk
before the reply; the buffer is the input of ``update`` (see :mod:`~llmos.kernel.updates`).
Each finished ``infer`` job and each ``learn`` call also
feed the version's :class:`~llmos.kernel.monitor.ModelMonitor`.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from llmos.contract.protocol import ErrorCode, KernelError
from llmos.contract.syscalls import MAX_TEXT_CHARS

from .feedback import FeedbackStore
from .jobs import Job
from .kinds import Core, Handler, JobKind, Request
from .monitor import ModelMonitor
from .registry import ModelVersion

if TYPE_CHECKING:
    from .updates import Update


def classifier_labels(version: ModelVersion) -> list[str]:
    """The label names of a sequence classifier; KernelError(BAD_REQUEST) for any other
    model."""
    try:
        config = json.loads((version.path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    if not any(str(a).endswith("ForSequenceClassification")
               for a in config.get("architectures") or []):
        raise KernelError(ErrorCode.BAD_REQUEST,
                          f"{version.ref} is not a classifier: learn needs a model with a "
                          "classification head (train one first)")
    id2label = config.get("id2label") or {}
    return [str(id2label[key]) for key in sorted(id2label, key=int)]


def check_examples(examples: list[dict[str, Any]], labels: list[str]) -> list[tuple[str, str]]:
    """``(text, label)`` pairs; KernelError(BAD_REQUEST) naming the first bad example."""
    pairs = []
    for i, example in enumerate(examples):
        where = f"learn: example {i}"
        extra = sorted(str(k) for k in set(example) - {"text", "label"})
        if extra:
            raise KernelError(ErrorCode.BAD_REQUEST, f"{where} has unknown key(s) {', '.join(extra)}")
        text, label = example.get("text"), example.get("label")
        if not isinstance(text, str) or not text.strip():
            raise KernelError(ErrorCode.BAD_REQUEST, f"{where}: text must be a non-empty string")
        if len(text) > MAX_TEXT_CHARS:
            raise KernelError(ErrorCode.BAD_REQUEST,
                              f"{where}: text has {len(text)} characters (limit {MAX_TEXT_CHARS})")
        if label not in labels:
            raise KernelError(ErrorCode.BAD_REQUEST,
                              f"{where}: unknown label {label!r} (the model's labels: "
                              f"{', '.join(labels)})")
        pairs.append((text, str(label)))
    return pairs


class Learning(JobKind):
    """The ``learn`` handler, per-model ``stats``, and the monitors of the versions that
    serve (no jobs of its own)."""

    def __init__(self, core: Core, update: Update, feedback: FeedbackStore) -> None:
        super().__init__(core)
        self.update, self.feedback = update, feedback
        self.monitors: dict[str, ModelMonitor] = {}

    def handlers(self) -> dict[str, Handler]:
        return {"learn": self._learn}

    def _learn(self, request: Request) -> dict[str, Any]:
        version = self.core.registry.resolve(request.args["model"], request.args["version"])
        pairs = check_examples(request.args["examples"], classifier_labels(version))
        ids = self.feedback.add(version.model, version.version, request.owner, pairs)
        self.monitor(version.ref).record_feedback(pairs)
        self.update.maybe_update(version, request.owner)
        return {"model": version.ref, "accepted": len(ids), "first_id": ids[0],
                "last_id": ids[-1], "buffered": self.feedback.count(version.model)}

    def monitor(self, handle: str) -> ModelMonitor:
        """The monitor of a version, made on first use with the references its training
        recorded (none for imported versions: no drift score then)."""
        monitor = self.monitors.get(handle)
        if monitor is None:
            name, _, number = handle.rpartition(":")
            reference = self.core.registry.resolve(name, int(number)).metrics.get("reference") or {}
            monitor = self.monitors[handle] = ModelMonitor(
                handle, reference.get("input_words"), reference.get("confidence"))
        return monitor

    def observe(self, job: Job, predictions: list[tuple[str, float]]) -> None:
        """A finished infer job: its texts, latency and predictions go to its monitor; a
        drift alert it raises may start an update (``--update-after``)."""
        monitor = self.monitor(job.args["handle"])
        raised = monitor.raised
        monitor.record(job.args["inputs"], time.time() - job.created_at, predictions)
        if monitor.raised > raised and self.core.config.update_after:
            name, _, number = job.args["handle"].rpartition(":")
            self.update.maybe_update(self.core.registry.resolve(name, int(number)), job.owner,
                               on_alert=True)

    def model_stats(self, model: str, version: int | None) -> dict[str, Any]:
        found = self.core.registry.resolve(model, version)
        return {**self.monitor(found.ref).snapshot(),
                "buffered_feedback": self.feedback.count(found.model)}
