"""An update job inside the driver host: train a candidate from feedback, measure, gate, save.

An :class:`UpdateSession` lives in the torch driver host between quanta, like a training
session. Its work is a sequence of phases (see :class:`~llmos.drivers.sessions.PhasedSession`):
load (the serving version, its tokenizer, the old data, a frozen copy of the
current version to distil from), measure the current version, one optimizer step per phase
(so a quantum ends within a step of its time), measure the candidate, save.

Every epoch mixes the training part of the feedback with ``replay`` rows drawn afresh from
the old training data (the rows the version was trained on); the loss is cross-entropy on
the labels plus ``distill`` times the KL divergence from the current version's predictions
on the replayed rows, which keeps the candidate's answers on the old domain near the
current ones. Both domains are measured for current and candidate, on the same rows: the
held-out feedback (the new domain) and the old data's validation split (the old domain, all
of it unless ``eval_limit`` is set), each with accuracy, macro-F1 and balanced accuracy
beside the majority-class baseline of the same rows.

The gate (:func:`gate`) compares the two versions row by row and decides with a confidence
bound (:mod:`llmos.plugins.gate`: Tango's paired score interval, 95% by default). It passes
when the old-domain drop is at most ``max_drop`` points across its whole interval and the
held-out gain is above zero across its whole interval. It is rejected when a measured
change fails its criterion, and undecided (too few rows to tell) otherwise. Only a passed
candidate may be promoted. The candidate is saved whatever the decision: the kernel keeps
one that did not pass as a version that does not serve, with the reason.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from llmos.drivers.sessions import PhasedSession
from llmos.drivers.training import evaluate_texts
from llmos.kernel import datasets
from llmos.plugins.gate import (
    CONFIDENCE,
    METHOD,
    combine,
    drop_at_most,
    gain_above_zero,
    paired_change,
)

from .methods import Trainable

_COMMON: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
#: Examples per optimizer step.
BATCH_SIZE = 16


@dataclass(frozen=True, slots=True)
class UpdateSpec:
    """What to learn: sent by the kernel in each ``update`` task."""

    base: str  # the serving version's folder
    method: dict[str, Any]  # {"method", "qualname", "params"}
    train_file: str  # JSON lines {"text", "label"}: feedback to train on
    holdout_file: str  # JSON lines: feedback held out for the gate
    old_data: dict[str, str]  # the dataset the version learned before ({"name"} or {"path"})
    output: str
    old_limit: int = 0  # the version was trained on this many rows of old_data (0: all)
    replay: int = 300
    distill: float = 1.0
    max_drop: float = 2.0
    seed: int = 0
    max_tokens: int = 128
    eval_limit: int = 0  # old-domain rows measured (0: the whole validation split)
    confidence: float = CONFIDENCE  # of the gate's intervals (two-sided)


def read_examples(path: str) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts.append(row["text"])
        labels.append(row["label"])
    return texts, labels


def import_method(qualname: str) -> Any:
    module_name, _, function = qualname.partition(":")
    return getattr(importlib.import_module(module_name), function)


class UpdateSession(PhasedSession):
    """One update job's models, data and progress through its phases."""

    def __init__(self, spec: UpdateSpec, threads: int) -> None:
        self.spec = spec
        self.report: dict[str, Any] = {}
        self.step = 0
        self.total_steps = 0
        self.loss = float("nan")
        super().__init__(threads)

    @classmethod
    def start(cls, spec: dict[str, Any], threads: int) -> UpdateSession:
        """The session of an ``update`` task's ``spec`` (registered as session ``update``)."""
        return cls(UpdateSpec(**spec), threads)

    def _progress(self) -> dict[str, Any]:
        progress: dict[str, Any] = {"step": self.step, "total_steps": self.total_steps,
                                    "loss": None if math.isnan(self.loss) else round(self.loss, 4)}
        if self.done:
            progress["report"] = self.report
        return progress

    # --- the phases -------------------------------------------------------------------

    def _work(self) -> Iterator[str]:
        spec = self.spec
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(spec.base, **_COMMON)
        current = AutoModelForSequenceClassification.from_pretrained(
            spec.base, use_safetensors=True, **_COMMON).eval()
        label_ids = {str(label): int(i) for i, label in current.config.id2label.items()}
        new_texts, new_labels = read_examples(spec.train_file)
        held_texts, held_labels = read_examples(spec.holdout_file)
        old = datasets.load(**spec.old_data)
        old_train, old_train_targets = old.labelled_for(label_ids, "train", spec.seed,
                                                        spec.old_limit)
        old_val, old_val_targets = old.labelled_for(label_ids, "validation", spec.seed,
                                                    spec.eval_limit)
        domains = {"new": (held_texts, [label_ids[x] for x in held_labels]),
                   "old": (old_val, old_val_targets)}
        yield "measuring the current version"
        before, before_rows = self._measure(current, tokenizer, domains)
        yield "preparing the method"
        torch.manual_seed(spec.seed)
        trainable: Trainable = import_method(spec.method["qualname"])(
            copy.deepcopy(current), spec.method["params"])
        optimizer = torch.optim.AdamW(trainable.parameters, lr=trainable.learning_rate,
                                      weight_decay=0.01)
        fresh = [(t, label_ids[x], False) for t, x in zip(new_texts, new_labels, strict=True)]
        replayable = [(t, y, True) for t, y in zip(old_train, old_train_targets, strict=True)]
        replay = min(spec.replay, len(replayable))
        per_epoch = math.ceil((len(fresh) + replay) / BATCH_SIZE)
        self.total_steps = max(1, math.ceil(per_epoch * trainable.epochs))
        rng = random.Random(spec.seed)
        batches: list[list[tuple[str, int, bool]]] = []
        teacher = current if spec.distill > 0 else None
        while self.step < self.total_steps:
            if not batches:  # a new epoch: the feedback and a fresh draw of old rows
                rows = fresh + rng.sample(replayable, replay)
                rng.shuffle(rows)
                batches = [rows[i:i + BATCH_SIZE] for i in range(0, len(rows), BATCH_SIZE)]
            self._train_step(trainable, optimizer, tokenizer, teacher, batches.pop(0))
            yield f"training: step {self.step}/{self.total_steps}"
        yield "measuring the candidate"
        trainable.module.eval()
        after, after_rows = self._measure(trainable.module, tokenizer, domains)
        yield "saving"
        output = Path(spec.output)
        shutil.rmtree(output, ignore_errors=True)
        output.mkdir(parents=True)
        trainable.save(output)
        tokenizer.save_pretrained(output)
        self.report = {
            "method": spec.method["method"], "params": spec.method["params"],
            "replay": replay, "distill": spec.distill, "steps": self.step,
            "examples": {"train": len(fresh), "held_out": len(held_texts), "old": len(old_val)},
            "current": {domain: scores["accuracy"] for domain, scores in before.items()},
            "candidate": {domain: scores["accuracy"] for domain, scores in after.items()},
            "scores": {"current": before, "candidate": after},
            "seconds": round(time.perf_counter() - started, 1),
            **gate(before_rows, after_rows, spec.max_drop, spec.confidence)}

    def _train_step(self, trainable: Trainable, optimizer: torch.optim.Optimizer,
                    tokenizer: Any, teacher: torch.nn.Module | None,
                    rows: list[tuple[str, int, bool]]) -> None:
        """One optimizer step: cross-entropy on every row; the distillation term on the
        replayed old rows only (on new rows the labels, not the current answers, lead)."""
        trainable.module.train()
        batch = tokenizer([text for text, _, _ in rows], padding="longest", truncation=True,
                          max_length=self.spec.max_tokens, return_tensors="pt")
        logits = trainable.module(**batch).logits
        loss = F.cross_entropy(logits, torch.tensor([label for _, label, _ in rows]))
        old = torch.tensor([is_old for _, _, is_old in rows])
        if teacher is not None and bool(old.any()):
            with torch.no_grad():
                target = torch.softmax(teacher(**batch).logits[old], dim=-1)
            loss = loss + self.spec.distill * F.kl_div(F.log_softmax(logits[old], dim=-1), target,
                                                       reduction="batchmean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable.parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        self.loss = value if math.isnan(self.loss) else 0.9 * self.loss + 0.1 * value
        self.step += 1

    def _measure(self, model: torch.nn.Module, tokenizer: Any,
                 domains: dict[str, tuple[list[str], list[int]]]
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, list[bool]]]:
        """Per domain: the scores (accuracy, macro-F1, balanced accuracy, the majority-class
        baseline, rows) and whether each row was answered right (for the paired gate)."""
        labels = len(model.config.id2label)
        scores: dict[str, dict[str, Any]] = {}
        right: dict[str, list[bool]] = {}
        for name, (texts, targets) in domains.items():
            recorder = _Recorder(model)
            metrics = evaluate_texts(recorder, tokenizer, texts, targets, labels,
                                     self.spec.max_tokens)
            right[name] = recorder.right(targets, metrics["confusion"])
            scores[name] = {key: round(metrics[key], 4)
                            for key in ("accuracy", "macro_f1", "balanced_accuracy")}
            scores[name]["majority_baseline"] = {
                key: round(value, 4) for key, value in metrics["majority_baseline"].items()}
            scores[name]["rows"] = metrics["rows"]
        return scores, right


class _Recorder(torch.nn.Module):
    """A classifier that keeps each row's predicted class as ``evaluate_texts`` runs it (in
    order, batch after batch), so the gate can pair the rows of two versions."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.predictions: list[int] = []

    def forward(self, **batch: torch.Tensor) -> Any:
        output = self.model(**batch)
        self.predictions += torch.softmax(output.logits.float(), dim=-1).argmax(-1).tolist()
        return output

    def right(self, targets: list[int], confusion: list[list[int]]) -> list[bool]:
        """Per row, whether the prediction was the target; checked against the confusion
        matrix that ``evaluate_texts`` counted from its own predictions."""
        counted = [[0] * len(confusion) for _ in confusion]
        for truth, guess in zip(targets, self.predictions, strict=True):
            counted[truth][guess] += 1
        if counted != [list(map(int, row)) for row in confusion]:
            raise RuntimeError("the recorded predictions differ from the evaluated ones")
        return [truth == guess for truth, guess in zip(targets, self.predictions, strict=True)]


def gate(current: dict[str, Sequence[bool]], candidate: dict[str, Sequence[bool]],
         max_drop: float, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """The update gate on per-row correctness (``current["new"][i]``: the current version
    answered held-out row ``i`` right; ``"old"``: the old domain's rows), the two versions
    paired on the same rows. Returns ``gain`` (new domain) and ``drop`` (old domain), the
    measured changes in points, and ``gate``: ``decision`` (passed, rejected or
    undecided), ``passed``, ``reason``, ``max_drop``, ``confidence``, ``method`` and per
    domain (``new``, ``old``) the rows, wins, losses, both accuracies, the change and its
    interval in points (:mod:`llmos.plugins.gate`)."""
    new = paired_change(current["new"], candidate["new"], confidence)
    old = paired_change(current["old"], candidate["old"], confidence)
    gained = gain_above_zero(new, "held-out feedback accuracy")
    kept = drop_at_most(old, max_drop, "old-domain accuracy")
    decision, reason = combine([gained, kept])
    return {"gain": gained.report["gain"], "drop": kept.report["drop"],
            "gate": {"decision": decision, "passed": decision == "passed", "reason": reason,
                     "max_drop": max_drop, "confidence": confidence, "method": METHOD,
                     "new": gained.report, "old": kept.report}}
