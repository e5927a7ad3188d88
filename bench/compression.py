"""Compressing the fine-tuned review classifier through the kernel: size, speed, accuracy.

One run, one kernel (PyTorch host, 2 threads): fine-tune MiniLM on the bundled reviews (the
demo's budget: 3,000 rows, one epoch, seeded), then run each recipe below as a ``compress``
job. Every job measures the parent (PyTorch fp32 eager) and its result on the validation
split and at batch 1 and 32 (padded to 128 tokens), inside the job (1 thread: the host keeps
a core for inference). The script then times the int8 versions again itself, interleaved
with PyTorch fp32 eager on the same input, at batch 1 and 128 tokens on 2 threads (other
processes slow torch, so baseline and subject alternate and the median of the rounds is
kept).

Recovery fine-tuning (low-rank, pruning; distilled from the parent) uses only the rows the
parent was trained on.

Run: ``.venv/bin/python bench/compression.py [--recover-steps 400] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmos.kernel.testing import running_kernel

TRAIN = {"data": "reviews", "name": "reviews", "limit": 3000, "epochs": 1.0, "learning_rate": 1e-4,
         "max_tokens": 64, "seed": 0}


def recipes(recover_steps: int) -> dict[str, tuple[list[dict[str, Any]], float]]:
    """Label -> (recipe, max drop in points)."""
    return {
        "int8 (OpenVINO PTQ)": ([{"step": "quantize", "method": "openvino-int8"}], 1.0),
        "int8 weights (OpenVINO)": ([{"step": "quantize", "method": "openvino-int8-weights"}], 1.0),
        "int8 (ONNX Runtime dynamic)": ([{"step": "quantize", "method": "onnxruntime-int8"}], 1.0),
        "25% FFN neurons + int8": ([{"step": "prune", "method": "neurons", "sparsity": 0.25,
                                    "recover_steps": recover_steps // 2},
                                   {"step": "quantize", "method": "openvino-int8"}], 1.0),
        "prune 50% + int8": ([{"step": "prune", "sparsity": 0.5, "recover_steps": recover_steps // 2},
                              {"step": "quantize", "method": "openvino-int8"}], 1.5),
        "prune 25% heads": ([{"step": "prune", "method": "heads", "sparsity": 0.25}], 100.0),
        "prune 50% FFN neurons": ([{"step": "prune", "method": "neurons", "sparsity": 0.5}], 100.0),
        "low-rank 50% + recovery": ([{"step": "lowrank", "budget": 0.5,
                                      "recover_steps": recover_steps, "learning_rate": 1e-4}], 2.0),
    }


def interleaved(int8_xml: Path, parent: Path, rounds: int = 5, runs: int = 20) -> tuple[float, float]:
    """Median ms at batch 1, 128 tokens: (PyTorch fp32 eager, OpenVINO int8), interleaved."""
    import openvino
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(parent)
    batch = tokenizer(["an unexpectedly moving film with sharp writing and a fine cast " * 4],
                      padding="max_length", truncation=True, max_length=128, return_tensors="np")
    feeds = {k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    model = AutoModelForSequenceClassification.from_pretrained(parent).eval()
    tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
    compiled = openvino.Core().compile_model(str(int8_xml), "CPU", {
        "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2})
    request = compiled.create_infer_request()

    def eager() -> None:
        with torch.inference_mode():
            model(**tensors)

    def timed(call: Any) -> float:
        for _ in range(3):
            call()
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            call()
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)

    pairs = [(timed(eager), timed(lambda: request.infer(feeds))) for _ in range(rounds)]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recover-steps", type=int, default=400,
                        help="low-rank recovery steps (pruning gets half)")
    parser.add_argument("--only", nargs="*", help="run only these recipe labels")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    plans = recipes(args.recover_steps)
    if args.only:
        plans = {k: v for k, v in plans.items() if k in args.only}
    home = Path(tempfile.mkdtemp(prefix="llmos-compress-"))
    results: dict[str, Any] = {}
    with running_kernel(home, "--devices", "torch:cpu") as kernel, \
            kernel.client(timeout=24 * 3600) as client:
        client.import_model("minilm")
        started = time.perf_counter()
        trained = client.train("minilm", **TRAIN)
        print(f"fine-tuned {trained['model']} in {time.perf_counter() - started:.0f} s: validation "
              f"accuracy {trained['metrics']['validation']['accuracy']:.4f}", flush=True)
        parent = next(m for m in client.models() if f"{m['model']}:{m['version']}" == trained["model"])
        for label, (recipe, max_drop) in plans.items():
            started = time.perf_counter()
            result = client.compress("reviews", recipe, max_drop=max_drop, name="reviews-small")
            result["seconds"] = round(time.perf_counter() - started, 1)
            results[label] = result
            report = result["report"]
            print(f"{label}: {result['model']} drop {report['drop']:.2f} gate "
                  f"{report['gate']['reason']} ratios {report['ratios']} ({result['seconds']} s)",
                  flush=True)
        versions = {f"{m['model']}:{m['version']}": m for m in client.models()}
        direct = {}
        for label, result in results.items():
            if result["model"] and result["report"]["result"]["form"] == "openvino":
                xml = Path(versions[result["model"]]["path"]) / "openvino_model.xml"
                direct[label] = interleaved(xml, Path(parent["path"]))
    _print(results, direct)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "direct": direct}, indent=2))
    return 0


def _print(results: dict[str, Any], direct: dict[str, tuple[float, float]]) -> None:
    first = next(iter(results.values()))["report"]["parent"]
    print("\nReview classifier (MiniLM, fine-tuned), validation split; latency padded to 128 "
          "tokens, measured inside each compress job (1 thread)\n")
    header = (f"{'version':<28}{'accuracy':>9}{'drop':>7}{'MB':>7}{'smaller':>8}{'runtime':>13}"
              f"{'b1 ms':>8}{'b32 ms':>8}{'b1 x':>6}  gate")
    print(header)
    eager = first["latency_ms"]["torch"]
    print(f"{'parent: PyTorch fp32 eager':<28}{first['accuracy']:>9.4f}{'':>7}"
          f"{first['bytes'] / 1e6:>7.1f}{'1.0x':>8}{'torch':>13}{eager['1']:>8.1f}{eager['32']:>8.0f}"
          f"{'1.0':>6}")
    for label, result in results.items():
        report = result["report"]
        measured = report["result"]
        runtime, ms = next(iter(measured["latency_ms"].items()))
        print(f"{label:<28}{measured['accuracy']:>9.4f}{report['drop']:>7.2f}"
              f"{measured['bytes'] / 1e6:>7.1f}{report['ratios']['size']:>7.2f}x{runtime:>13}"
              f"{ms['1']:>8.1f}{ms['32']:>8.0f}{report['ratios']['speedup_batch1']:>6.2f}  "
              f"{'pass' if report['gate']['passed'] else 'FAIL'} (max {report['gate']['max_drop']})")
    if direct:
        print("\nInterleaved in this process, batch 1, 128 tokens, 2 threads (median of 5 rounds)\n")
        print(f"{'version':<28}{'eager ms':>10}{'int8 ms':>9}{'speed-up':>10}")
        for label, (eager_ms, int8_ms) in direct.items():
            print(f"{label:<28}{eager_ms:>10.2f}{int8_ms:>9.2f}{eager_ms / int8_ms:>9.2f}x")
    for label, result in results.items():
        for step in result["report"]["steps"]:
            if "ranks" in step:
                print(f"\n{label}: per-layer ranks {step['ranks']}; Linear parameters "
                      f"{step['linear_parameters']}")


if __name__ == "__main__":
    raise SystemExit(main())
