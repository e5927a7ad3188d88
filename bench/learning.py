"""The incremental-learning scenario: a movie-review classifier meets drug reviews.

One kernel (PyTorch host), one run:

1. MiniLM is fine-tuned on movie reviews (``--train-limit`` rows, 1 epoch: the demo's model).
2. Monitoring: a stream of movie reviews, then a stream of unseen drug reviews, is
   classified; the drift scores (PSI against the training data) are read with ``stats``
   after each (the monitor's window then holds both streams).
3. ``--feedback`` labelled drug reviews (from the package's training file) go to the
   feedback buffer with ``learn``.
4. Updates from the same feedback, each from the movie-only version: ``lora`` and ``online``
   (replay of old rows and distillation, the defaults), gated (max drop 2 points); and the
   naive fine-tune (``finetune``, no replay, no distillation), measured but not promoted.
5. Every version is evaluated on the movie test split and on the drug reviews' own test file
   (neutral reviews dropped) with ``evaluate``.

The baseline is the movie-only model in the same run. Run:
``.venv/bin/python bench/learning.py [--feedback 300] [--train-limit 3000] [--json out.json]``.
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

#: (label, update options): each update starts from the movie-only version.
UPDATES: list[tuple[str, dict[str, Any]]] = [
    ("lora + replay + distill", {"method": "lora"}),
    ("online top-2 + replay + distill", {"method": "online"}),
    ("naive fine-tune", {"method": "finetune", "replay": 0, "distill": 0.0, "promote": False}),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--feedback", type=int, default=300)
    parser.add_argument("--train-limit", type=int, default=3000)
    parser.add_argument("--stream", type=int, default=300, help="texts per monitored stream")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    movies, drugs = datasets.load("reviews"), datasets.load("drugs")
    drug_texts, drug_targets = drugs.split("train")
    feedback = [{"text": t, "label": drugs.labels[y]}
                for t, y in zip(drug_texts[:args.feedback], drug_targets[:args.feedback], strict=True)]
    home = Path(tempfile.mkdtemp(prefix="llmos-learning-"))
    results: dict[str, Any] = {"feedback": len(feedback), "versions": {}}
    with running_kernel(home, "--devices", "torch:cpu") as kernel, \
            kernel.client(timeout=24 * 3600) as client:
        client.import_model("minilm")
        started = time.perf_counter()
        trained = client.train("minilm", data="reviews", name="sentiment",
                               limit=args.train_limit, epochs=1.0, max_tokens=128)
        base = trained["model"]
        results["train_seconds"] = round(time.perf_counter() - started, 1)
        client.load("sentiment")

        def measure(handle: str) -> dict[str, float]:
            name, _, number = handle.rpartition(":")
            return {domain: client.evaluate(name, version=int(number), data=domain,
                                            split="test")["accuracy"]
                    for domain in ("reviews", "drugs")}

        results["versions"][base] = {"label": "movie-only (baseline)", **measure(base)}
        print(f"{base}: {results['versions'][base]}", flush=True)
        results["drift"] = {}
        unseen_drugs = drugs.split("validation")[0] + drug_texts[args.feedback:]
        for name, texts in (("movie stream", movies.split("validation")[0][:args.stream]),
                            ("drug stream", unseen_drugs[:args.stream])):
            for start in range(0, len(texts), 32):  # the window then holds both streams
                client.classify("sentiment", texts[start:start + 32])
            stats = client.stats("sentiment")
            results["drift"][name] = {"texts": len(texts), **stats["drift"],
                                      "alerts": [a["kind"] for a in stats["alerts"]]}
            print(f"{name}: {results['drift'][name]}", flush=True)
        client.learn("sentiment", feedback)
        for label, options in UPDATES:
            started = time.perf_counter()
            update = client.update("sentiment", version=int(base.rpartition(":")[2]),
                                   limit=args.feedback, **options)
            seconds = round(time.perf_counter() - started, 1)
            entry = {"label": label, "seconds": seconds, "passed": update["passed"],
                     "promoted": update["promoted"], "reason": update["reason"],
                     "gate_report": {k: update["report"][k] for k in ("current", "candidate",
                                                                      "gain", "drop")},
                     **measure(update["model"])}
            results["versions"][update["model"]] = entry
            print(f"{update['model']}: {entry}", flush=True)
            if update["promoted"]:  # the next update starts from the movie-only model again
                while update["promote_job"] and client.job(update["promote_job"])["state"] \
                        not in ("DONE", "FAILED"):
                    time.sleep(0.1)
                assert client.rollback("sentiment")["model"] == base
    baseline = results["versions"][base]
    print(f"\nMiniLM fine-tuned on {args.train_limit} movie reviews; {len(feedback)} drug reviews "
          f"as feedback (held out for the gate: 20%). Test sets: movie reviews "
          f"{len(movies.split('test')[0])} rows, drug reviews {len(drugs.split('test')[0])} rows "
          "(the package's test file, neutral dropped).\n")
    print(f"{'version':<14}{'update':<34}{'movies':>8}{'Δ':>7}{'drugs':>8}{'Δ':>7}  gate")
    for handle, entry in results["versions"].items():
        d_movies = 100 * (entry["reviews"] - baseline["reviews"])
        d_drugs = 100 * (entry["drugs"] - baseline["drugs"])
        gate = "" if "passed" not in entry else (
            ("promoted" if entry["promoted"] else "passed") if entry["passed"] else "rejected")
        print(f"{handle:<14}{entry['label']:<34}{entry['reviews']:>8.3f}{d_movies:>+7.1f}"
              f"{entry['drugs']:>8.3f}{d_drugs:>+7.1f}  {gate}")
    for name, drift in results["drift"].items():
        print(f"drift after the {name} ({drift['texts']} more texts): input length PSI "
              f"{drift['input_length']:.3f}, confidence PSI {drift['confidence']:.3f}, "
              f"alerts {drift['alerts'] or 'none'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
