"""Fine-tuning MiniLM on the bundled movie reviews through the kernel: accuracy and time.

Runs the ``train`` syscall twice on one kernel (PyTorch host, 2 threads): the demo's
budget (``--demo-limit`` rows, 1 epoch) and a full run (every training row, ``--epochs``).
Both use the same seeded 80/10/10 split, so their test accuracies compare directly; the
baseline is the majority class on the same test split.

Run: ``.venv/bin/python bench/finetune.py [--epochs 2] [--demo-limit 2000] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from llmos.kernel import datasets
from llmos.kernel.testing import running_kernel


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--demo-limit", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    test_targets = datasets.load("reviews").split("test")[1]
    majority = max(test_targets.count(0), test_targets.count(1)) / len(test_targets)
    runs: dict[str, dict[str, Any]] = {}
    plans = [("demo budget", {"limit": args.demo_limit, "epochs": 1.0})]
    if not args.skip_full:
        plans.append(("full", {"limit": 0, "epochs": args.epochs}))
    home = Path(tempfile.mkdtemp(prefix="llmos-finetune-"))
    with running_kernel(home, "--devices", "torch:cpu") as kernel, \
            kernel.client(timeout=24 * 3600) as client:
        client.import_model("minilm")
        for label, plan in plans:
            started = time.perf_counter()
            result = client.train("minilm", data="reviews", name=label.replace(" ", "-"),
                                  max_tokens=args.max_tokens, **plan)
            seconds = time.perf_counter() - started
            runs[label] = {"seconds": round(seconds, 1), "steps": result["steps"], **plan,
                           "test_accuracy": result["metrics"]["test"]["accuracy"],
                           "test_macro_f1": result["metrics"]["test"]["macro_f1"],
                           "validation_accuracy": result["metrics"]["validation"]["accuracy"]}
            print(f"{label}: {runs[label]}", flush=True)
    print(f"\nMiniLM fine-tuned on Rotten Tomatoes reviews (fresh/rotten), test split of "
          f"{len(test_targets)} rows; majority class {majority:.3f}\n")
    print(f"{'run':<14}{'rows':>8}{'epochs':>8}{'steps':>7}{'minutes':>9}{'test acc':>10}{'macro F1':>10}")
    for label, run in runs.items():
        rows = run["limit"] or "all"
        print(f"{label:<14}{rows:>8}{run['epochs']:>8}{run['steps']:>7}{run['seconds'] / 60:>9.1f}"
              f"{run['test_accuracy']:>10.3f}{run['test_macro_f1']:>10.3f}")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "majority": majority}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
