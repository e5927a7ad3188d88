"""Training defaults, before and now: MiniLM fine-tuned with no hyper-parameter flags.

Two contenders train the same rows with the same seed and the same threads as a driver
host (``--threads``, of which training uses all but one):

- ``before``: the training session of git revision ``--before`` (default ``44bb8df``, the
  last one with fixed defaults: 2 epochs, batches of 32, learning rate 5e-5 with 6% warm-up,
  plain cross-entropy, the last step's weights), loaded from ``git show``;
- ``now``: :class:`llmos.drivers.training.TrainingSession` with every default (chosen from
  the model and the data, class-weighted loss, the best validation macro-F1 kept, early stop).

Cases (``--cases``): ``reviews-3000`` and ``reviews-200`` (the bundled movie reviews at
``--limit 3000`` / ``--limit 200``), ``drugs`` (the drug reviews' own training file, scored on
its own test file). Before the measured runs each contender does the same warm-up (a
session on 64 rows, one quantum of steps, not reported); then, per case, the runs
alternate ``before``, ``now``, ... ``--runs`` times, and every run is printed: seconds
(construction to saved model), steps, test accuracy beside the majority class's, macro-F1,
balanced accuracy, the classes the model predicts, and the warning the job result would
carry.

The sessions run in this process, as a driver host runs them (one ``run`` call per quantum
of ``--quantum`` seconds), without a kernel around them: the kernel adds only the dispatch
of each quantum.

Run: ``.venv/bin/python bench/finetune.py [--cases reviews-3000,reviews-200,drugs]
[--runs 1] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from llmos.drivers import training
from llmos.kernel.sources import _minilm_path

REPO = Path(__file__).resolve().parents[1]
CASES: dict[str, tuple[dict[str, str], int]] = {  # name -> (data, limit)
    "reviews-3000": ({"name": "reviews"}, 3000),
    "reviews-200": ({"name": "reviews"}, 200),
    "drugs": ({"name": "drugs"}, 0),
}


@dataclass(frozen=True, slots=True)
class Contender:
    name: str
    module: ModuleType


def load_before(revision: str) -> ModuleType:
    """``drivers/training.py`` as of ``revision``, as a module of the llmos.drivers package
    (its import of the wire protocol follows the module's later home in llmos.contract)."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:drivers/training.py"],
                            check=True, capture_output=True, text=True).stdout
    source = source.replace("from llmos.kernel.protocol import", "from llmos.contract.protocol import")
    path = Path(tempfile.mkdtemp(prefix="llmos-before-")) / "training_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("llmos.drivers.training_before", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def scores(split: dict[str, Any]) -> dict[str, Any]:
    """Accuracy, macro-F1, balanced accuracy, the majority class's accuracy and the classes
    predicted, from a split's confusion matrix (either version's metrics have one)."""
    confusion = np.asarray(split["confusion"])
    support = confusion.sum(axis=1)
    present = support > 0
    return {"accuracy": round(float(np.trace(confusion) / confusion.sum()), 4),
            "macro_f1": round(float(split["macro_f1"]), 4),
            "balanced_accuracy": round(float(np.mean(np.diag(confusion)[present]
                                                     / support[present])), 4),
            "majority": round(float(support.max() / support.sum()), 4),
            "predicted_classes": int((confusion.sum(axis=0) > 0).sum())}


def make_spec(contender: Contender, data: dict[str, str], limit: int) -> Any:
    """The contender's TrainSpec for these rows, with its own defaults for the rest."""
    folder = Path(tempfile.mkdtemp(prefix="llmos-finetune-"))
    return contender.module.TrainSpec(base=str(_minilm_path()), data=data, limit=limit,
                                      checkpoint=str(folder / "checkpoint"),
                                      output=str(folder / "output"), checkpoint_every=1e9)


def warm_up(contender: Contender, threads: int, quantum: float) -> None:
    """A session on 64 review rows and one quantum of its steps (imports, first kernels)."""
    spec = make_spec(contender, {"name": "reviews"}, 64)
    contender.module.TrainingSession(spec, threads).run(quantum)


def train_once(contender: Contender, data: dict[str, str], limit: int, threads: int,
               quantum: float) -> dict[str, Any]:
    """One training run to a saved model; its time, steps and test scores."""
    spec = make_spec(contender, data, limit)
    started = time.perf_counter()
    session = contender.module.TrainingSession(spec, threads)
    while not session.done:
        session.run(quantum)
    metrics = session.finish()
    seconds = time.perf_counter() - started
    labels = session.dataset.labels
    test = metrics["test"]
    warning = training.learning_warning(
        test if "balanced_accuracy" in test else {
            **test, "balanced_accuracy": scores(test)["balanced_accuracy"],
            "majority_baseline": {"accuracy": scores(test)["majority"]}}, labels, "test")
    return {"contender": contender.name, "seconds": round(seconds, 1), "steps": session.step,
            "total_steps": session.total_steps, "rows": len(session.texts),
            "test_rows": test["rows"], **scores(test), "warning": warning,
            "settings": metrics.get("training")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="reviews-3000,reviews-200,drugs")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--before", default="44bb8df")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quantum", type=float, default=1.0)
    parser.add_argument("--only", choices=("before", "now"), help="run one contender")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    contenders = [Contender("before", load_before(args.before)), Contender("now", training)]
    if args.only:
        contenders = [c for c in contenders if c.name == args.only]
    for contender in contenders:  # the same warm-up for each: not reported
        warm_up(contender, args.threads, args.quantum)
    runs: list[dict[str, Any]] = []
    for case in args.cases.split(","):
        data, limit = CASES[case]
        for number in range(args.runs):
            for contender in contenders:
                run = {"case": case, "run": number + 1,
                       **train_once(contender, data, limit, args.threads, args.quantum)}
                runs.append(run)
                print(json.dumps(run), flush=True)
    print(f"\n{'case':<14}{'who':<8}{'run':>4}{'rows':>6}{'steps':>7}{'seconds':>9}"
          f"{'test acc':>10}{'majority':>10}{'macro F1':>10}{'bal acc':>9}{'classes':>8}  warning")
    for run in runs:
        print(f"{run['case']:<14}{run['contender']:<8}{run['run']:>4}{run['rows']:>6}"
              f"{run['steps']:>7}{run['seconds']:>9.1f}{run['accuracy']:>10.3f}"
              f"{run['majority']:>10.3f}{run['macro_f1']:>10.3f}{run['balanced_accuracy']:>9.3f}"
              f"{run['predicted_classes']:>8}  {'yes' if run['warning'] else '-'}")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "threads": args.threads,
                                         "before": args.before}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
