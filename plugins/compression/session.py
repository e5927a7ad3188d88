"""A compress job inside the driver host: run a recipe, measure, gate, save.

A :class:`CompressionSession` lives in the torch driver host between quanta, like a
training session. Its work is a sequence of phases (load, measure the parent, each recipe
step, measure the result, save); each ``compress`` task runs phases for about ``seconds``
and reports progress, so the kernel publishes progress events and inference queued
meanwhile runs between quanta. Accuracy is measured on the dataset's validation split for
the parent and for the result, in the form the result will be served in; latency at batch
1 and 32 (padded to ``latency_tokens``) on the result's runtime, in rounds alternating with
the parent's PyTorch fp32 eager (``baseline_ms``), which the speed-up is computed from.

A job tries one recipe, or for a search several, each from the parent. When the last phase
ends, the progress carries the ``report`` (the parent's measurements, one entry per recipe,
and the Pareto ``front`` of those within the quality gate) and the ``outputs``: the saved
folder of each front member, for the kernel to import as a new version. Nothing else is
kept.

The quality gate (:func:`_gate`) pairs parent and result on the same validation rows and
decides with a confidence bound (:mod:`llmos.plugins.gate`: Tango's paired score interval,
95% by default): it passes when the whole interval of the accuracy drop is within
``max_drop`` points, is rejected when the measured drop exceeds it, and is undecided (too
few rows to tell; no version made) otherwise.
"""

from __future__ import annotations

import copy
import importlib
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from llmos.contract.protocol import ErrorCode, KernelError
from llmos.drivers.sessions import PhasedSession
from llmos.kernel import datasets
from llmos.plugins.gate import CONFIDENCE, METHOD, drop_at_most, paired_change

from .candidate import GRAPH_FILES, Candidate, Predict, StepContext
from .structure import load_compressed, needs_rebuild

#: Latency runs per shape: (warm-up, timed) calls at batch 1 and 32.
LATENCY_RUNS = {1: (3, 10), 32: (1, 2)}
#: A result's latency is measured in this many rounds alternating with the parent's
#: (other processes slow torch: baseline and subject interleave); medians are kept.
LATENCY_ROUNDS = 3
_COMMON: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}

Step = Callable[[Candidate, dict[str, Any], StepContext], Candidate]


@dataclass(frozen=True, slots=True)
class CompressSpec:
    """What to compress: sent by the kernel in each ``compress`` task."""

    base: str
    #: Recipes to try from the parent (one for a plain compress; a grid for a search).
    recipes: list[list[dict[str, Any]]]
    data: dict[str, str]
    output: str
    workdir: str
    max_drop: float | None = None
    seed: int = 0
    max_tokens: int = 128
    latency_tokens: int = 128
    eval_limit: int = 0  # evaluate on at most this many validation rows (0: all)
    #: Calibrate and recover on at most this many training rows (0: all): the rows the
    #: parent was trained on, so recovery sees no data the parent did not.
    train_limit: int = 0
    confidence: float = CONFIDENCE  # of the quality gate's interval (two-sided)


@dataclass(slots=True)
class _Measured:
    accuracy: float
    parameters: int
    bytes: int
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    #: The parent's latency measured alongside (alternating rounds), for the ratios.
    baseline_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    #: Per validation row, whether it was answered right (the gate pairs the rows).
    right: list[bool] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "parameters": self.parameters, "bytes": self.bytes,
                "latency_ms": self.latency_ms}


def import_step(qualname: str) -> Step:
    """The step function named ``"package.module:function"``."""
    module_name, _, function = qualname.partition(":")
    step = getattr(importlib.import_module(module_name), function)
    if not callable(step):
        raise TypeError(f"{qualname} is not callable")
    return step


def load_parent(path: str) -> Candidate:
    """The parent classifier (safetensors only); BAD_REQUEST if it has no classifier head."""
    config = AutoConfig.from_pretrained(path, **_COMMON)
    if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        raise KernelError(ErrorCode.BAD_REQUEST, f"{path} is not a classifier: compress measures "
                          "accuracy, so fine-tune it first (llmos train)")
    if needs_rebuild(config):
        model = load_compressed(path)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True,
                                                                   **_COMMON)
    return Candidate(model.eval(), AutoTokenizer.from_pretrained(path, **_COMMON))


def weight_bytes(folder: Path) -> int:
    """Bytes of the weights a version keeps: safetensors, or its graph files."""
    files = [*folder.glob("*.safetensors"), *(folder / f for f in GRAPH_FILES.values()),
             folder / "openvino_model.bin"]
    return sum(f.stat().st_size for f in files if f.is_file())


class CompressionSession(PhasedSession):
    """One compress job's models and progress through its phases."""

    def __init__(self, spec: CompressSpec, threads: int) -> None:
        self.spec = spec
        self.report: dict[str, Any] = {"candidates": []}
        self.outputs: dict[str, str] = {}
        # the yields of _work (one per recipe step, three per recipe, one more), and its end
        self.total_phases = 2 + sum(3 + len(recipe) for recipe in spec.recipes)
        super().__init__(threads)

    @classmethod
    def start(cls, spec: dict[str, Any], threads: int) -> CompressionSession:
        """The session of a ``compress`` task's ``spec`` (registered as session ``compress``)."""
        return cls(CompressSpec(**spec), threads)

    def _progress(self) -> dict[str, Any]:
        progress: dict[str, Any] = {
            "fraction": 1.0 if self.done else round(self.finished_phases / self.total_phases, 3)}
        if self.done:
            progress["report"] = self.report
            progress["outputs"] = self.outputs
        return progress

    # --- the phases -------------------------------------------------------------------

    def _work(self) -> Iterator[str]:
        spec = self.spec
        workdir = Path(spec.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        dataset = datasets.load(**spec.data)
        parent = load_parent(spec.base)
        known = {str(label): int(i) for i, label in parent.model.config.id2label.items()}
        texts, targets = dataset.labelled_for(known, "validation", spec.seed, spec.eval_limit)
        train_texts, train_targets = dataset.labelled_for(known, "train", spec.seed,
                                                          spec.train_limit)
        context = StepContext(workdir, train_texts, train_targets,
                              spec.max_tokens, self.threads, spec.seed, teacher=parent.model)
        yield "measuring the parent"
        parent_predict = parent.predictor(self.threads)
        before = self._measure(parent, parent_predict, texts, targets, weight_bytes(Path(spec.base)))
        self.report["parent"] = before.describe()
        for number, recipe in enumerate(spec.recipes):
            where = f"recipe {number + 1}/{len(spec.recipes)}: " if len(spec.recipes) > 1 else ""
            entry: dict[str, Any] = {"steps": []}
            candidate = Candidate(copy.deepcopy(parent.model), parent.tokenizer)
            for index, step in enumerate(recipe):
                yield f"{where}step {index + 1}/{len(recipe)}: {step['step']}"
                started = time.perf_counter()
                notes = len(candidate.notes)
                candidate = import_step(step["qualname"])(candidate, step["params"], context)
                done = {"step": step["step"], "params": step["params"],
                        "seconds": round(time.perf_counter() - started, 2)}
                for note in candidate.notes[notes:]:
                    done.update(note)
                entry["steps"].append(done)
            yield f"{where}saving"
            output = Path(spec.output) / str(number)
            drivers = candidate.save(output)
            yield f"{where}measuring the result"
            after = self._measure(candidate, candidate.predictor(self.threads), texts, targets,
                                  weight_bytes(output), parent_predict)
            entry["result"] = {**after.describe(), "form": candidate.form, "drivers": drivers}
            entry["baseline_ms"] = after.baseline_ms
            entry.update(_gate(before, after, spec.max_drop, spec.confidence))
            self.report["candidates"].append(entry)
            if entry["gate"]["passed"]:
                self.outputs[str(number)] = str(output)
            else:
                shutil.rmtree(output, ignore_errors=True)
            shutil.rmtree(context.workdir, ignore_errors=True)
            context.workdir.mkdir(parents=True)
        yield "choosing"
        self.report["front"] = pareto_front(self.report["candidates"])
        for number in list(self.outputs):
            if int(number) not in self.report["front"]:
                shutil.rmtree(self.outputs.pop(number), ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)

    def _measure(self, candidate: Candidate, predict: Predict, texts: list[str],
                 targets: list[int], size: int, baseline: Predict | None = None) -> _Measured:
        """Accuracy on ``texts``, then latency at batch 1 and 32; with a ``baseline`` (the
        parent), its latency too, alternating with the candidate's round by round."""
        right: list[bool] = []
        for start in range(0, len(texts), 64):
            feeds = candidate.feeds(texts[start:start + 64], self.spec.max_tokens)
            guesses = predict(feeds).argmax(-1)
            right += [int(g) == t for g, t in zip(guesses, targets[start:start + 64], strict=True)]
        parameters = sum(p.numel() for p in candidate.model.parameters())
        measured = _Measured(sum(right) / max(1, len(texts)), parameters, size, right=right)
        runtime = {"torch": "torch", "onnx": "onnxruntime", "openvino": "openvino"}[candidate.form]
        mine: dict[str, float] = {}
        theirs: dict[str, float] = {}
        for batch, (warmup, runs) in LATENCY_RUNS.items():
            feeds = candidate.feeds(texts[:1] * batch, self.spec.latency_tokens, pad=True)
            if baseline is None:
                mine[str(batch)] = _latency(predict, feeds, warmup, runs * LATENCY_ROUNDS)
                continue
            rounds = [(_latency(baseline, feeds, warmup, runs), _latency(predict, feeds, warmup, runs))
                      for _ in range(LATENCY_ROUNDS)]
            theirs[str(batch)] = round(statistics.median(r[0] for r in rounds), 3)
            mine[str(batch)] = round(statistics.median(r[1] for r in rounds), 3)
        measured.latency_ms[runtime] = mine
        if theirs:
            measured.baseline_ms = {"torch": theirs}
        return measured


def _gate(before: _Measured, after: _Measured, limit: float | None,
          confidence: float = CONFIDENCE) -> dict[str, Any]:
    """``drop`` (accuracy points, measured), ``ratios`` against the parent, and the ``gate``:
    ``decision`` (passed, rejected, undecided; with no ``limit``, passed), ``passed``,
    ``reason``, ``max_drop``, and the paired comparison (rows, wins, losses, the drop's
    ``interval`` in points at ``confidence``; see :mod:`llmos.plugins.gate`)."""
    change = paired_change(before.right, after.right, confidence)
    check = drop_at_most(change, 100.0 if limit is None else limit)
    drop = round((before.accuracy - after.accuracy) * 100, 3)
    result_ms = next(iter(after.latency_ms.values()))["1"]
    parent_ms = (after.baseline_ms or before.latency_ms)["torch"]["1"]
    ratios = {"size": round(before.bytes / max(1, after.bytes), 3),
              "speedup_batch1": round(parent_ms / result_ms, 3)}
    paired = {key: check.report[key] for key in ("rows", "wins", "losses", "interval")}
    gate: dict[str, Any] = {"max_drop": limit, "confidence": confidence, "method": METHOD, **paired}
    if limit is None:
        gate.update(decision="passed", passed=True, reason="no gate asked")
    elif check.decision == "rejected":  # the measured drop alone is too large
        gate.update(decision="rejected", passed=False,
                    reason=f"accuracy dropped {drop:.2f} points ({before.accuracy:.4f} -> "
                           f"{after.accuracy:.4f}), more than the max drop {limit:g}: no version "
                           "made")
    else:
        gate.update(decision=check.decision, passed=check.decision == "passed",
                    reason=check.reason + ("" if check.decision == "passed" else
                                           ": no version made"))
    return {"drop": drop, "ratios": ratios, "gate": gate}


def pareto_front(candidates: list[dict[str, Any]]) -> list[int]:
    """Indices of the gate-passing candidates no other passing one beats on every count:
    bytes, batch-1 latency on its runtime, and accuracy (at least as good, one better)."""
    def point(entry: dict[str, Any]) -> tuple[float, float, float]:
        result = entry["result"]
        return (result["bytes"], next(iter(result["latency_ms"].values()))["1"], -result["accuracy"])

    passing = [i for i, entry in enumerate(candidates) if entry["gate"]["passed"]]
    front = []
    for i in passing:
        mine = point(candidates[i])
        beaten = any(all(o <= m for o, m in zip(other, mine, strict=True)) and other != mine
                     for other in (point(candidates[j]) for j in passing if j != i))
        if not beaten:
            front.append(i)
    return front


def _latency(predict: Callable[[Any], Any], feeds: dict[str, Any], warmup: int, runs: int) -> float:
    """Median milliseconds of ``predict(feeds)``."""
    for _ in range(warmup):
        predict(feeds)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        predict(feeds)
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 3)

