"""The incremental-learning scenario: a movie-review classifier meets drug reviews.

One kernel (PyTorch host). For each seed (``--seeds``), the whole scenario:

1. MiniLM is fine-tuned on movie reviews (``--train-limit`` rows, 1 epoch: the demo's
   model), with the seed's train/validation/test cut of the movie reviews.
2. Monitoring: a stream of movie reviews, then a stream of unseen drug reviews, is
   classified; the drift scores (PSI against the training data) are read with ``stats``
   after each (the monitor's window then holds both streams).
3. ``--feedback`` labelled drug reviews (from the seed's cut of the package's training
   file) go to the feedback buffer with ``learn``.
4. Updates from the same feedback, each from the movie-only version of this seed: ``lora``
   and ``online`` (replay of old rows and distillation, the defaults), gated (max drop 2
   points); and the naive fine-tune (``finetune``, no replay, no distillation), gated the
   same way but never promoted. The order of the three turns with the seed (interleaved
   contenders). The gate pairs the current version and the candidate on the same rows: the
   held-out feedback (20%, or ``--holdout``) and the whole movie validation split, with a
   95% interval for each (:mod:`llmos.plugins.gate`).
5. Every version is evaluated on the movie test split and on the drug reviews' own test file
   (neutral reviews dropped) with ``evaluate``: accuracy, macro-F1 and balanced accuracy
   beside the majority class of the same rows. The table says whether the drop measured on
   the movie test split lies in the gate's interval (measured on the validation split).

The baseline is the movie-only model of the same seed. Every run is printed. Run:
``.venv/bin/python bench/learning.py [--seeds 0,1,2] [--methods lora,online,finetune]
[--feedback 300] [--holdout 0.2] [--train-limit 3000] [--json out.json]``.
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
SCORES = ("accuracy", "macro_f1", "balanced_accuracy")


def run_seed(client: Any, seed: int, args: argparse.Namespace, movies: datasets.Dataset,
             drugs: datasets.Dataset) -> dict[str, Any]:
    """The whole scenario for one seed; every version's scores and every gate's report."""
    name = f"sentiment-s{seed}"
    drug_texts, drug_targets = drugs.split("train", seed)
    feedback = [{"text": t, "label": drugs.labels[y]}
                for t, y in zip(drug_texts[:args.feedback], drug_targets[:args.feedback], strict=True)]
    run: dict[str, Any] = {"seed": seed, "feedback": len(feedback), "versions": {}}
    seed_started = started = time.perf_counter()
    trained = client.train("minilm", data="reviews", name=name, limit=args.train_limit,
                           epochs=1.0, max_tokens=128, seed=seed)
    base = trained["model"]
    run["train_seconds"] = round(time.perf_counter() - started, 1)
    client.load(name)

    def measure(handle: str) -> dict[str, Any]:
        model, _, number = handle.rpartition(":")
        scores = {}
        for domain in ("reviews", "drugs"):
            result = client.evaluate(model, version=int(number), data=domain, split="test",
                                     seed=seed)
            scores[domain] = {**{k: round(result[k], 4) for k in SCORES}, "rows": result["rows"],
                              "majority": round(result["majority_baseline"]["accuracy"], 4),
                              "majority_macro_f1": round(result["majority_baseline"]["macro_f1"], 4)}
        return scores

    run["versions"][base] = {"label": "movie-only (baseline)", **measure(base)}
    print(f"seed {seed} {base}: {run['versions'][base]}", flush=True)
    run["drift"] = {}
    unseen_drugs = drugs.split("validation", seed)[0] + drug_texts[args.feedback:]
    for stream, texts in (("movie stream", movies.split("validation", seed)[0][:args.stream]),
                          ("drug stream", unseen_drugs[:args.stream])):
        for start in range(0, len(texts), 32):  # the window then holds both streams
            client.classify(name, texts[start:start + 32])
        stats = client.stats(name)
        run["drift"][stream] = {"texts": len(texts), **stats["drift"],
                                "alerts": [a["kind"] for a in stats["alerts"]]}
        print(f"seed {seed} {stream}: {run['drift'][stream]}", flush=True)
    client.learn(name, feedback)
    chosen = [(label, options) for label, options in UPDATES if options["method"] in args.methods]
    turn = seed % len(chosen)
    for label, options in chosen[turn:] + chosen[:turn]:
        started = time.perf_counter()
        update = client.update(name, version=int(base.rpartition(":")[2]), limit=args.feedback,
                               seed=seed, holdout=args.holdout, **options)
        seconds = round(time.perf_counter() - started, 1)
        report = update["report"]
        entry = {"label": label, "seconds": seconds, "passed": update["passed"],
                 "promoted": update["promoted"], "reason": update["reason"],
                 "decision": report["gate"].get("decision"),
                 "gate_report": {k: report.get(k) for k in ("current", "candidate", "scores",
                                                            "gain", "drop", "gate", "examples")},
                 **measure(update["model"])}
        run["versions"][update["model"]] = entry
        print(f"seed {seed} {update['model']}: {entry}", flush=True)
        if update["promoted"]:  # the next update starts from the movie-only model again
            deadline = time.monotonic() + 600
            while update["promote_job"] and client.job(update["promote_job"])["state"] \
                    not in ("DONE", "FAILED"):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the promotion of {update['model']} did not end")
                time.sleep(0.1)
            assert client.rollback(name)["model"] == base
    run["base"] = base
    run["seconds"] = round(time.perf_counter() - seed_started, 1)
    return run


def interval(part: dict[str, Any] | None) -> str:
    if not part or "interval" not in part:
        return "-"
    low, high = part["interval"]
    return f"[{low:+.2f}, {high:+.2f}]"


def show(runs: list[dict[str, Any]], args: argparse.Namespace, movies: datasets.Dataset,
         drugs: datasets.Dataset) -> None:
    """Every run: test scores against the seed's baseline; the gate's measurements, its
    intervals and decision; whether the test-split drop lies in the gate's interval."""
    print(f"\nMiniLM fine-tuned on {args.train_limit} movie reviews (1 epoch); {args.feedback} drug "
          f"reviews as feedback (held out for the gate: {args.holdout or 0.2:.0%}). Test sets: movie reviews "
          f"{len(movies.split('test')[0])} rows (the seed's cut), drug reviews "
          f"{len(drugs.split('test')[0])} rows (the package's test file, neutral dropped).\n")
    print(f"{'seed':<5}{'version':<18}{'update':<33}{'movies':>7}{'Δ':>6}{'drugs':>7}{'Δ':>6}"
          f"{'F1':>7}{'ΔF1':>6}{'maj':>6}  gate: gain [95%] | drop [95%] (rows) -> decision; "
          "test drop in interval?")
    contained = []
    for run in runs:
        baseline = run["versions"][run["base"]]
        for handle, entry in run["versions"].items():
            movies_d = 100 * (entry["reviews"]["accuracy"] - baseline["reviews"]["accuracy"])
            drugs_d = 100 * (entry["drugs"]["accuracy"] - baseline["drugs"]["accuracy"])
            f1_d = 100 * (entry["drugs"]["macro_f1"] - baseline["drugs"]["macro_f1"])
            line = (f"{run['seed']:<5}{handle:<18}{entry['label']:<33}"
                    f"{entry['reviews']['accuracy']:>7.3f}{movies_d:>+6.1f}"
                    f"{entry['drugs']['accuracy']:>7.3f}{drugs_d:>+6.1f}"
                    f"{entry['drugs']['macro_f1']:>7.3f}{f1_d:>+6.1f}{entry['drugs']['majority']:>6.3f}")
            if "gate_report" in entry:
                report = entry["gate_report"]
                gate = report["gate"]
                test_drop = -movies_d
                old = gate.get("old")
                inside = old is not None and old["interval"][0] <= test_drop <= old["interval"][1]
                contained.append(inside)
                verdict = (entry["decision"] or ("passed" if entry["passed"] else "rejected")) + (
                    ", promoted" if entry["promoted"] else "")
                line += (f"  {report['gain']:+.2f} {interval(gate.get('new'))} | "
                         f"{report['drop']:+.2f} {interval(old)} "
                         f"({gate.get('new', {}).get('rows', '?')}/{old['rows'] if old else '?'}) "
                         f"-> {verdict}; test drop {test_drop:+.2f} {'in' if inside else 'OUTSIDE'}")
            print(line)
    print()
    for label, _ in UPDATES:
        entries = [e for run in runs for e in run["versions"].values() if e["label"] == label]
        if not entries:
            continue
        decisions = [e["decision"] for e in entries]
        print(f"{label}: {', '.join(decisions)}; promoted {sum(e['promoted'] for e in entries)} "
              f"of {len(entries)}; update seconds {', '.join(str(e['seconds']) for e in entries)}")
    print(f"test-split drop inside the gate's interval: {sum(contained)} of {len(contained)}")
    for run in runs:
        for stream, drift in run["drift"].items():
            print(f"seed {run['seed']}: drift after the {stream} ({drift['texts']} more texts): "
                  f"input length PSI {drift['input_length']:.3f}, confidence PSI "
                  f"{drift['confidence']:.3f}, alerts {drift['alerts'] or 'none'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, one run each")
    parser.add_argument("--feedback", type=int, default=300)
    parser.add_argument("--train-limit", type=int, default=3000)
    parser.add_argument("--stream", type=int, default=300, help="texts per monitored stream")
    parser.add_argument("--holdout", type=float, default=None,
                        help="share of the feedback held out for the gate (default: update's, 0.2)")
    parser.add_argument("--methods", default="lora,online,finetune",
                        help="the updates to run (comma-separated; default all three)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    args.methods = args.methods.split(",")
    movies, drugs = datasets.load("reviews"), datasets.load("drugs")
    home = Path(tempfile.mkdtemp(prefix="llmos-learning-"))
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    with running_kernel(home, "--devices", "torch:cpu") as kernel, \
            kernel.client(timeout=24 * 3600) as client:
        client.import_model("minilm")
        for seed in seeds:
            runs.append(run_seed(client, seed, args, movies, drugs))
            if args.json:  # kept after every seed: a long run that stops keeps what it has
                args.json.write_text(json.dumps({"runs": runs}, indent=2))
            print(f"seed {seed} done after {time.perf_counter() - started:.0f} s", flush=True)
    show(runs, args, movies, drugs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
