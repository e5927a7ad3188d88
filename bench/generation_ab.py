"""Decode step time of two generation engines, step-interleaved, on SmolLM2 in one process.

The baseline is another version of ``drivers/generation.py`` given as a file (for example
``git show main:drivers/generation.py > /tmp/base_generation.py``); the contender is the
installed ``llmos.drivers.generation``. Both engines get the same chat requests of
``bench/generation.py`` on one model, prefill in one step, then decode one step each in
turn (order swapped every step), so both see the same machine load: use it on a shared
machine, where whole-run timings are too noisy. Each repeat reports the median per-step
ratio baseline/contender; the greedy texts of both must be identical.

Run: ``.venv/bin/python bench/generation_ab.py MODEL_FOLDER /tmp/base_generation.py
[--rows 1 16] [--tokens 64] [--repeats 3] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from generation import messages
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmos.drivers import generation as contender


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("baseline_generation", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def started(module: ModuleType, model: Any, tokenizer: Any, rows: int, tokens: int) -> Any:
    """An engine of ``module`` with ``rows`` requests submitted and prefilled."""
    engine = module.GenerationEngine(model, tokenizer, max_seqs=max(16, rows))
    for i in range(rows):
        engine.submit(engine.prepare(i, {"messages": messages(i), "max_tokens": tokens,
                                         "temperature": 0.0, "ignore_eos": True}))
    engine.step()
    return engine


def one_repeat(engines: dict[str, Any]) -> tuple[dict[str, list[float]], dict[str, dict]]:
    """Alternate single steps until both are idle; per-engine step times and final texts."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    texts: dict[str, dict] = {name: {} for name in engines}
    names = list(engines)
    turn = 0
    while any(engine.busy for engine in engines.values()):
        for name in names if turn % 2 == 0 else names[::-1]:
            begin = time.perf_counter()
            events = engines[name].step()
            times[name].append(time.perf_counter() - begin)
            texts[name].update({e["id"]: e["text"] for e in events if "finish" in e})
        turn += 1
    return {name: steps[:-1] for name, steps in times.items()}, texts  # last: rows leave


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a converted SmolLM2 folder")
    parser.add_argument("baseline", type=Path, help="another drivers/generation.py")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(str(args.model)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    modules = {"baseline": load_module(args.baseline), "contender": contender}
    for rows in args.rows:
        ratios, medians = [], {name: [] for name in modules}
        for _ in range(args.repeats):
            engines = {name: started(module, model, tokenizer, rows, args.tokens)
                       for name, module in modules.items()}
            times, texts = one_repeat(engines)
            assert texts["baseline"] == texts["contender"], "greedy outputs differ"
            for name, steps in times.items():
                medians[name].append(statistics.median(steps))
            ratios.append(statistics.median(
                b / c for b, c in zip(times["baseline"], times["contender"], strict=True)))
        base, new = (1000 * statistics.median(medians[n]) for n in modules)
        each = ", ".join(f"{r:.3f}" for r in ratios)
        print(f"rows {rows}: step baseline {base:.1f} ms, contender {new:.1f} ms, "
              f"baseline/contender {statistics.median(ratios):.3f} (repeats {each}); "
              f"outputs identical")


if __name__ == "__main__":
    main()
