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
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class TrainSpec:
    """What to train: sent by the kernel in each ``train`` task."""

    base: str
    data: dict[str, str]
    checkpoint: str
    output: str
    epochs: float = 2.0
    batch_size: int = 32
    learning_rate: float = 5e-5
    seed: int = 0
    max_tokens: int = 128
    limit: int = 0  # use at most this many training rows (0: all)
    checkpoint_every: float = 30.0  # seconds between checkpoints (taken at quantum ends)


def evaluate_texts(model: PreTrainedModel, tokenizer: Any, texts: list[str], targets: list[int],
                   num_labels: int, max_tokens: int = 128, batch_size: int = 64) -> dict[str, Any]:
    """Accuracy, macro-F1, the confusion matrix (rows: true, columns: predicted) and the
    histogram of the top class's confidence (bins: monitor.CONFIDENCE_EDGES)."""
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
            "macro_f1": float(np.mean(f1s)), "confusion": confusion.tolist(), "rows": len(texts),
            "confidence_histogram": histogram(confidences, CONFIDENCE_EDGES)}


def evaluate_folder(path: str, data: dict[str, str], split: str, seed: int) -> dict[str, Any]:
    """Metrics of the classifier in ``path`` on a dataset split (labels matched by name)."""
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
    return {**metrics, "split": split, "labels": [model.config.id2label[i] for i in range(len(known))]}


class TrainingSession:
    """One training job's model, optimizer and position in the data."""

    def __init__(self, spec: TrainSpec, threads: int) -> None:
        self.threads = max(1, threads - 1)  # one core stays free for inference elsewhere
        self.spec = spec
        self.dataset = datasets.load(**spec.data)
        self.texts, self.targets = self.dataset.split("train", spec.seed)
        if spec.limit:
            self.texts, self.targets = self.texts[:spec.limit], self.targets[:spec.limit]
        labels = self.dataset.labels
        torch.manual_seed(spec.seed)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            spec.base, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, use_safetensors=True,
            ignore_mismatched_sizes=True, **_COMMON)
        self.tokenizer = AutoTokenizer.from_pretrained(spec.base, **_COMMON)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=spec.learning_rate,
                                           weight_decay=0.01)
        self.steps_per_epoch = math.ceil(len(self.texts) / spec.batch_size)
        self.total_steps = max(1, math.ceil(self.steps_per_epoch * spec.epochs))
        self.step = 0
        self.loss = float("nan")
        self.checkpointed_at = time.monotonic()
        folder = Path(spec.checkpoint)
        old = folder.with_name(folder.name + ".old")
        if not folder.exists() and old.exists():  # a crash between the two renames below
            os.replace(old, folder)
        if (folder / "state.json").exists():
            self._restore()

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def _lr(self, step: int) -> float:
        """Linear warm-up over the first 6% of steps, then linear decay to zero."""
        warmup = max(1, int(0.06 * self.total_steps))
        scale = step / warmup if step < warmup else (self.total_steps - step) / max(
            1, self.total_steps - warmup)
        return self.spec.learning_rate * max(0.0, scale)

    def _batch(self, step: int) -> tuple[list[str], torch.Tensor]:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = np.random.RandomState(self.spec.seed + epoch).permutation(len(self.texts))
        picked = order[index * self.spec.batch_size:(index + 1) * self.spec.batch_size]
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
        elapsed = time.perf_counter() - started
        if time.monotonic() - self.checkpointed_at >= self.spec.checkpoint_every:
            self._checkpoint()
        return {"step": self.step, "total_steps": self.total_steps, "loss": round(self.loss, 4),
                "examples_per_s": round(seen / elapsed, 1) if elapsed else 0.0,
                "epoch": round(self.step / self.steps_per_epoch, 3), "done": self.done}

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """A batch's inputs, padded to its longest row."""
        return dict(self.tokenizer(texts, padding="longest", truncation=True,
                                   max_length=self.spec.max_tokens, return_tensors="pt"))

    def _train_step(self, step: int) -> tuple[float, int]:
        """One optimizer step on batch ``step``: (its mean loss, examples in the batch)."""
        texts, labels = self._batch(step)
        batch = self._encode(texts)
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(step)
        key = DropoutKey(seed=self.spec.seed, step=step, rows=range(len(texts)))
        with keyed_dropout(self.model, key):  # the masks any world size draws for these rows
            loss = self.model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), len(texts)

    def close(self) -> None:
        """Release what the session holds beyond memory (nothing for one process; a
        distributed session stops its ranks)."""

    def finish(self) -> dict[str, Any]:
        """Evaluate on validation and test, save the model folder; returns the metrics."""
        metrics: dict[str, Any] = {}
        for split in ("validation", "test"):
            texts, targets = self.dataset.split(split, self.spec.seed)
            metrics[split] = evaluate_texts(self.model, self.tokenizer, texts, targets,
                                            len(self.dataset.labels), self.spec.max_tokens)
        train_texts, _ = self.dataset.split("train", self.spec.seed)
        metrics["reference"] = {  # what monitoring compares live traffic with
            "input_words": histogram([words(t) for t in train_texts], LENGTH_EDGES),
            "confidence": metrics["test"]["confidence_histogram"]}
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
            tensors = {"rng": torch.get_rng_state()}
            names = {p: n for n, p in self.model.named_parameters()}
            for param, state in self.optimizer.state.items():
                for key, value in state.items():
                    tensors[f"{names[param]}::{key}"] = value.detach().clone()
            save_file(tensors, str(staging / "optimizer.safetensors"))
            (staging / "state.json").write_text(json.dumps({"step": self.step, "loss": self.loss}))
        self.checkpointed_at = time.monotonic()
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            os.replace(folder, old)
        os.replace(staging, folder)
        shutil.rmtree(old, ignore_errors=True)

    def _restore(self) -> None:
        folder = Path(self.spec.checkpoint)
        self.model.load_state_dict(load_file(str(folder / "model.safetensors")))
        tensors = load_file(str(folder / "optimizer.safetensors"))
        torch.set_rng_state(tensors.pop("rng"))
        params = dict(self.model.named_parameters())
        for name_key, value in tensors.items():
            name, key = name_key.split("::")
            self.optimizer.state[params[name]][key] = value
        state = json.loads((folder / "state.json").read_text())
        self.step, self.loss = int(state["step"]), float(state["loss"])
