"""Fine-tuning a sequence classifier in quanta, with checkpoints, and evaluating one.

A :class:`TrainingSession` lives in the PyTorch driver host between quanta. Each quantum
runs optimizer steps for about ``seconds``; at the end of a quantum, once
``checkpoint_every`` seconds have passed since the last one, it writes a checkpoint (model
and optimizer tensors as safetensors, step and RNG state as JSON/tensors, never pickle)
into the job's folder, replacing the previous one atomically (it is written as
``checkpoint.tmp`` and renamed; a write that fails, e.g. on a full disk, removes the
``.tmp`` and fails the task with an error naming it, and the previous checkpoint stays).
A session rebuilt from that folder (after a host or kernel restart) continues at the same
step with the same data order, so a resumed job trains on exactly the batches it has not
seen yet. Dropout is keyed (:mod:`llmos.drivers.dropout`): a step's masks depend on the
seed, the step and each row's place in the batch, so a resumed job, and a data-parallel
one, draw the same masks.

Hyper-parameters a request leaves out are chosen from the model and the data
(:func:`choose_settings`): a learning rate scaled to the encoder's width, batches and epochs
scaled to the number of training rows, warm-up then linear decay, and a loss weighted by
inverse class frequency. A few times per run the model is scored on validation rows; the
weights with the best macro-F1 are kept (and written with each checkpoint), and the run
stops early once that score has not improved for :data:`PATIENCE` checks. Every score
reports the majority-class baseline beside it, and :func:`learning_warning` says when a
model does not beat it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from llmos.contract.protocol import ErrorCode, KernelError
from llmos.kernel import datasets
from llmos.kernel.monitor import CONFIDENCE_EDGES, LENGTH_EDGES, histogram, words
from llmos.kernel.registry import writing

from .dropout import DropoutKey, keyed_dropout

_COMMON: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}


#: Auto epochs: enough passes for about this many training examples in all ...
EXAMPLES_BUDGET = 9000
#: ... but at least one epoch and at most this many.
MAX_AUTO_EPOCHS = 10.0
#: Auto batch size: 16 rows below this many training rows (more, smaller steps), else 32.
SMALL_DATA_ROWS = 5000
#: Auto learning rate: BERT-base's fine-tuning rate at its width, scaled by 768 / the
#: model's hidden size (narrow encoders such as MiniLM need larger steps), clamped.
REFERENCE_LR, REFERENCE_WIDTH = 5e-5, 768
LR_RANGE = (2e-5, 2e-4)
#: Share of the steps spent warming the learning rate up linearly (then linear decay to 0).
WARMUP_SHARE = 0.1
#: Validation checks in a run (model selection on macro-F1), on at most SELECTION_ROWS rows.
CHECKS = 6
SELECTION_ROWS = 500
#: Checks in a row without a better validation macro-F1 before a run with chosen epochs
#: stops early (a run with requested epochs runs them all, and still keeps the best weights).
PATIENCE = 3
#: Classes are uneven, and the loss weighted by inverse class frequency, when the largest
#: class has more than this many times the rows of the smallest.
UNEVEN = 1.5
#: One-sided 5% z-score: a score beats the baseline when it is this many standard errors above.
Z_95 = 1.645


@dataclass(frozen=True, slots=True)
class TrainSpec:
    """What to train: sent by the kernel in each ``train`` task. ``epochs``, ``batch_size``
    and ``learning_rate`` left None are chosen by :func:`choose_settings`."""

    base: str
    data: dict[str, str]
    checkpoint: str
    output: str
    epochs: float | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    seed: int = 0
    max_tokens: int = 128
    limit: int = 0  # use at most this many training rows (0: all)
    checkpoint_every: float = 30.0  # seconds between checkpoints (taken at quantum ends)


@dataclass(frozen=True, slots=True)
class Settings:
    """The hyper-parameters a training run uses, requested or chosen."""

    epochs: float
    batch_size: int
    learning_rate: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    #: Optimizer steps between two validation checks.
    check_every: int
    #: Loss weight of each class: inverse frequency in the training rows (mean 1) when the
    #: classes are uneven, else all 1.
    class_weights: tuple[float, ...]
    #: Stop after PATIENCE checks without a better validation macro-F1 (epochs were chosen).
    early_stop: bool


def choose_settings(spec: TrainSpec, counts: list[int], width: int) -> Settings:
    """The run's settings for training rows with ``counts`` rows per class and a model of
    hidden size ``width``: the spec's values where given, else the defaults above."""
    rows = max(1, sum(counts))
    batch = spec.batch_size or (16 if rows < SMALL_DATA_ROWS else 32)
    epochs = spec.epochs or min(MAX_AUTO_EPOCHS, max(1.0, EXAMPLES_BUDGET / rows))
    rate = spec.learning_rate or min(LR_RANGE[1], max(
        LR_RANGE[0], REFERENCE_LR * REFERENCE_WIDTH / max(1, width)))
    per_epoch = math.ceil(rows / batch)
    total = max(1, math.ceil(per_epoch * epochs))
    uneven = max(counts) > UNEVEN * max(1, min(counts))
    weights = [rows / (len(counts) * max(1, c)) if uneven else 1.0 for c in counts]
    mean = sum(weights) / len(weights)
    return Settings(epochs=round(epochs, 3), batch_size=batch, learning_rate=rate,
                    steps_per_epoch=per_epoch, total_steps=total,
                    warmup_steps=max(1, round(WARMUP_SHARE * total)),
                    check_every=max(1, math.ceil(total / CHECKS)),
                    class_weights=tuple(round(w / mean, 4) for w in weights),
                    early_stop=spec.epochs is None)


def _majority_baseline(confusion: np.ndarray) -> dict[str, float]:
    """The scores of always answering the split's most frequent class."""
    support = confusion.sum(axis=1)
    share = float(support.max() / max(1, support.sum()))
    present = int((support > 0).sum())
    return {"accuracy": share, "macro_f1": 2 * share / (1 + share) / max(1, present),
            "balanced_accuracy": 1 / max(1, present)}


def _balanced_accuracy(confusion: np.ndarray) -> float:
    """Mean recall over the classes present in the split."""
    support = confusion.sum(axis=1)
    present = support > 0
    return float(np.mean(np.diag(confusion)[present] / support[present])) if present.any() else 0.0


def learning_warning(metrics: dict[str, Any], labels: list[str], split: str) -> str | None:
    """Why a classifier's scores on ``split`` (``evaluate_texts``'s result) show it learned
    little, or None. It warns when the model answers one class for every row, or when
    neither its accuracy beats the majority-class baseline nor its balanced accuracy beats
    chance (1 / classes present), each by a one-sided z-test at 5% (:data:`Z_95`)."""
    confusion = np.asarray(metrics["confusion"])
    support = confusion.sum(axis=1)
    present = support > 0
    if metrics["rows"] < 2 or present.sum() < 2:
        return None  # one class in the split: nothing to compare with
    predicted = np.flatnonzero(confusion.sum(axis=0))
    if len(predicted) == 1:
        return (f"the model answers {labels[predicted[0]]!r} for all {metrics['rows']} {split} "
                "rows: it learned only the class prior (try more rows or epochs, or check the "
                "labels)")
    n, k = metrics["rows"], int(present.sum())
    base = metrics["majority_baseline"]["accuracy"]
    beats_accuracy = (metrics["accuracy"] - base) / math.sqrt(
        max(base * (1 - base), 1e-12) / n) >= Z_95
    spread = sum((1 / k) * (1 - 1 / k) / c for c in support[present]) / k ** 2
    beats_chance = (metrics["balanced_accuracy"] - 1 / k) / math.sqrt(spread) >= Z_95
    if beats_accuracy or beats_chance:
        return None
    return (f"the model does not beat the majority-class baseline on {split}: accuracy "
            f"{metrics['accuracy']:.3f} vs {base:.3f} for always answering the most frequent "
            f"class, balanced accuracy {metrics['balanced_accuracy']:.3f} vs chance {1 / k:.3f} "
            "(try more rows or epochs, or check the labels)")


def evaluate_texts(model: PreTrainedModel, tokenizer: Any, texts: list[str], targets: list[int],
                   num_labels: int, max_tokens: int = 128, batch_size: int = 64) -> dict[str, Any]:
    """Accuracy, macro-F1, balanced accuracy, the majority-class baseline's scores on the
    same rows, the number of classes predicted, the confusion matrix (rows: true, columns:
    predicted) and the histogram of the top class's confidence (bins:
    monitor.CONFIDENCE_EDGES)."""
    model.eval()
    predictions: list[int] = []
    confidences: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding="longest", truncation=True,
                              max_length=max_tokens, return_tensors="pt")
            probs = torch.softmax(model(**batch).logits.float(), dim=-1)
            predictions += probs.argmax(-1).tolist()
            confidences += probs.max(-1).values.tolist()
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    for truth, guess in zip(targets, predictions, strict=True):
        confusion[truth, guess] += 1
    f1s = []
    for k in range(num_labels):
        tp = confusion[k, k]
        precision = tp / max(1, confusion[:, k].sum())
        recall = tp / max(1, confusion[k, :].sum())
        f1s.append(0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
    return {"accuracy": float(np.trace(confusion) / max(1, len(texts))),
            "macro_f1": float(np.mean(f1s)), "balanced_accuracy": _balanced_accuracy(confusion),
            "majority_baseline": _majority_baseline(confusion),
            "predicted_classes": int((confusion.sum(axis=0) > 0).sum()),
            "confusion": confusion.tolist(), "rows": len(texts),
            "confidence_histogram": histogram(confidences, CONFIDENCE_EDGES)}


def evaluate_folder(path: str, data: dict[str, str], split: str, seed: int) -> dict[str, Any]:
    """Metrics of the classifier in ``path`` on a dataset split, or on every row (split
    ``all``), labels matched by name; ``warning`` is :func:`learning_warning`'s."""
    dataset = datasets.load(**data)
    if not list(Path(path).glob("*.safetensors")):
        raise KernelError(ErrorCode.BAD_REQUEST, f"{path} holds a runtime's graph, not torch "
                          "weights: its compress report has its accuracy")
    from .pytorch import load_hf  # a compressed version may need its layers reshaped

    model, _ = load_hf(path)
    known = {str(label): int(i) for i, label in model.config.id2label.items()}
    texts, targets = dataset.labelled_for(known, split, seed)
    tokenizer = AutoTokenizer.from_pretrained(path, **_COMMON)
    metrics = evaluate_texts(model, tokenizer, texts, targets, len(known))
    labels = [model.config.id2label[i] for i in range(len(known))]
    return {**metrics, "split": split, "labels": labels,
            "warning": learning_warning(metrics, labels, split)}


class TrainingSession:
    """One training job's model, optimizer, position in the data and best weights so far."""

    def __init__(self, spec: TrainSpec, threads: int) -> None:
        self.threads = max(1, threads - 1)  # one core stays free for inference elsewhere
        self.spec = spec
        self.dataset = datasets.load(**spec.data)
        self.texts, self.targets = self.dataset.split("train", spec.seed)
        if spec.limit:
            self.texts, self.targets = self.texts[:spec.limit], self.targets[:spec.limit]
        labels = self.dataset.labels
        selection = self.dataset.split("validation", spec.seed)
        self.selection = (selection[0][:SELECTION_ROWS], selection[1][:SELECTION_ROWS])
        torch.manual_seed(spec.seed)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            spec.base, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, use_safetensors=True,
            ignore_mismatched_sizes=True, **_COMMON)
        self.tokenizer = AutoTokenizer.from_pretrained(spec.base, **_COMMON)
        counts = [self.targets.count(i) for i in range(len(labels))]
        self.settings = choose_settings(spec, counts, getattr(self.model.config, "hidden_size", 768))
        #: The loss's class weights; None (plain cross-entropy) when the classes are even.
        self.class_weights = None if len(set(self.settings.class_weights)) == 1 else \
            torch.tensor(self.settings.class_weights, dtype=torch.float32)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.settings.learning_rate,
                                           weight_decay=0.01)
        self.steps_per_epoch = self.settings.steps_per_epoch
        self.total_steps = self.settings.total_steps
        self.step = 0
        self.loss = float("nan")
        #: Model selection: the best validation macro-F1 so far, its step and weights, and
        #: the checks since it last improved.
        self.best_f1, self.best_step, self.misses = -1.0, 0, 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.checkpointed_at = time.monotonic()
        folder = Path(spec.checkpoint)
        old = folder.with_name(folder.name + ".old")
        if not folder.exists() and old.exists():  # a crash between the two renames below
            os.replace(old, folder)
        if (folder / "state.json").exists():
            self._restore()

    @property
    def stopped_early(self) -> bool:
        """Epochs were chosen and the validation macro-F1 has not improved for PATIENCE
        checks."""
        return self.settings.early_stop and self.misses >= PATIENCE

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps or self.stopped_early

    def _lr(self, step: int) -> float:
        """Linear warm-up over the first WARMUP_SHARE of the steps, then linear decay to zero."""
        warmup, total = self.settings.warmup_steps, self.total_steps
        scale = step / warmup if step < warmup else (total - step) / max(1, total - warmup)
        return self.settings.learning_rate * max(0.0, scale)

    def _batch(self, step: int) -> tuple[list[str], torch.Tensor]:
        epoch, index = divmod(step, self.steps_per_epoch)
        size = self.settings.batch_size
        order = np.random.RandomState(self.spec.seed + epoch).permutation(len(self.texts))
        picked = order[index * size:(index + 1) * size]
        return [self.texts[i] for i in picked], torch.tensor([self.targets[i] for i in picked])

    @classmethod
    def start(cls, spec: dict[str, Any], threads: int) -> TrainingSession:
        """The session of a ``train`` task's ``spec`` (a :class:`~llmos.drivers.sessions.Session`)."""
        return cls(TrainSpec(**spec), threads)

    def run(self, seconds: float) -> dict[str, Any]:
        """Train for about ``seconds`` (at least one step), checkpoint, report progress; on
        the last quantum also the ``metrics`` (:meth:`finish`), the saved model's
        ``output`` folder and the ``labels``."""
        inference_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            progress = self._run(seconds)
        finally:
            torch.set_num_threads(inference_threads)
        if self.done:
            progress.update(metrics=self.finish(), output=self.spec.output,
                            labels=self.dataset.labels)
        return progress

    def _run(self, seconds: float) -> dict[str, Any]:
        self.model.train()
        started, first = time.perf_counter(), self.step
        seen = 0
        while not self.done and (self.step == first or time.perf_counter() - started < seconds):
            value, examples = self._train_step(self.step)
            self.loss = value if math.isnan(self.loss) else 0.9 * self.loss + 0.1 * value
            self.step += 1
            seen += examples
            if self.step % self.settings.check_every == 0 or self.step >= self.total_steps:
                self._check()
        elapsed = time.perf_counter() - started
        if time.monotonic() - self.checkpointed_at >= self.spec.checkpoint_every:
            self._checkpoint()
        return {"step": self.step, "total_steps": self.total_steps, "loss": round(self.loss, 4),
                "examples_per_s": round(seen / elapsed, 1) if elapsed else 0.0,
                "epoch": round(self.step / self.steps_per_epoch, 3),
                "best_macro_f1": round(self.best_f1, 4) if self.best_f1 >= 0 else None,
                "best_step": self.best_step, "done": self.done}

    def _check(self) -> None:
        """Score the validation rows kept for selection: keep a copy of the weights if their
        macro-F1 is at least the best so far (on a tie the later, further trained weights
        win); a check that does not improve it strictly is a miss (PATIENCE misses stop a
        run whose epochs were chosen)."""
        score = evaluate_texts(self.model, self.tokenizer, *self.selection,
                               len(self.dataset.labels), self.spec.max_tokens)["macro_f1"]
        self.model.train()
        self.misses = 0 if score > self.best_f1 else self.misses + 1
        if score >= self.best_f1:
            self.best_f1, self.best_step = score, self.step
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """A batch's inputs, padded to its longest row."""
        return dict(self.tokenizer(texts, padding="longest", truncation=True,
                                   max_length=self.spec.max_tokens, return_tensors="pt"))

    def _train_step(self, step: int) -> tuple[float, int]:
        """One optimizer step on batch ``step``: (its mean class-weighted loss, examples in
        the batch)."""
        texts, labels = self._batch(step)
        batch = self._encode(texts)
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(step)
        key = DropoutKey(seed=self.spec.seed, step=step, rows=range(len(texts)))
        with keyed_dropout(self.model, key):  # the masks any world size draws for these rows
            logits = self.model(**batch).logits
        loss = torch.nn.functional.cross_entropy(logits, labels, weight=self.class_weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), len(texts)

    def close(self) -> None:
        """Release what the session holds beyond memory (nothing for one process; a
        distributed session stops its ranks)."""

    def finish(self) -> dict[str, Any]:
        """Take the best weights seen, evaluate on validation and test, save the model folder.
        Returns the metrics per split, ``reference`` (for monitoring), ``training`` (the
        settings and the selection) and ``warning`` (:func:`learning_warning` on test, or on
        validation when the test split is empty)."""
        if self.best_state is not None and self.best_step != self.step:
            self.model.load_state_dict(self.best_state)
        labels = self.dataset.labels
        metrics: dict[str, Any] = {}
        for split in ("validation", "test"):
            texts, targets = self.dataset.split(split, self.spec.seed)
            metrics[split] = evaluate_texts(self.model, self.tokenizer, texts, targets,
                                            len(labels), self.spec.max_tokens)
        judged = "test" if metrics["test"]["rows"] else "validation"
        train_texts, _ = self.dataset.split("train", self.spec.seed)
        metrics["reference"] = {  # what monitoring compares live traffic with
            "input_words": histogram([words(t) for t in train_texts], LENGTH_EDGES),
            "confidence": metrics["test"]["confidence_histogram"]}
        metrics["training"] = {**asdict(self.settings), "steps": self.step,
                               "best_step": self.best_step,
                               "stopped_early": self.step < self.total_steps,
                               "selection_macro_f1": round(self.best_f1, 4),
                               "selection_rows": len(self.selection[0])}
        metrics["warning"] = learning_warning(metrics[judged], labels, judged)
        output = Path(self.spec.output)
        shutil.rmtree(output, ignore_errors=True)
        with writing("the trained model", output, partial=output):
            self.model.save_pretrained(output, safe_serialization=True)
            self.tokenizer.save_pretrained(output)
        return metrics

    # --- checkpoints ------------------------------------------------------------------

    def _checkpoint(self) -> None:
        """Write the checkpoint into ``checkpoint.tmp`` and swap it in; KernelError naming
        it (the ``.tmp`` removed, the previous checkpoint intact) if a write fails."""
        folder = Path(self.spec.checkpoint)
        staging = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        with writing(f"the checkpoint at step {self.step}", staging, partial=staging):
            staging.mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in self.model.state_dict().items()},
                      str(staging / "model.safetensors"))
            if self.best_state is not None:
                save_file({k: v.contiguous() for k, v in self.best_state.items()},
                          str(staging / "best.safetensors"))
            tensors = {"rng": torch.get_rng_state()}
            names = {p: n for n, p in self.model.named_parameters()}
            for param, state in self.optimizer.state.items():
                for key, value in state.items():
                    tensors[f"{names[param]}::{key}"] = value.detach().clone()
            save_file(tensors, str(staging / "optimizer.safetensors"))
            (staging / "state.json").write_text(json.dumps({
                "step": self.step, "loss": self.loss, "best_f1": self.best_f1,
                "best_step": self.best_step, "misses": self.misses}))
        self.checkpointed_at = time.monotonic()
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            os.replace(folder, old)
        os.replace(staging, folder)
        shutil.rmtree(old, ignore_errors=True)

    def _restore(self) -> None:
        folder = Path(self.spec.checkpoint)
        self.model.load_state_dict(load_file(str(folder / "model.safetensors")))
        if (folder / "best.safetensors").exists():
            self.best_state = load_file(str(folder / "best.safetensors"))
        tensors = load_file(str(folder / "optimizer.safetensors"))
        torch.set_rng_state(tensors.pop("rng"))
        params = dict(self.model.named_parameters())
        for name_key, value in tensors.items():
            name, key = name_key.split("::")
            self.optimizer.state[params[name]][key] = value
        state = json.loads((folder / "state.json").read_text())
        self.step, self.loss = int(state["step"]), float(state["loss"])
        self.best_f1 = float(state.get("best_f1", -1.0))
        self.best_step, self.misses = int(state.get("best_step", 0)), int(state.get("misses", 0))
