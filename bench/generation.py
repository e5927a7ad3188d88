"""Generation throughput and latency: llmos continuous batching vs transformers ``generate``.

One run measures, on the bundled SmolLM2-135M-Instruct (fp32, greedy, exactly
``--tokens`` new tokens per request, customer-service chat prompts):

(a) transformers ``generate`` called one request at a time, in this process;
(b) one static batch of all requests with ``generate`` (left-padded): the ceiling here;
(c) llmos: one client thread per request, requests arriving ``--stagger`` seconds apart,
    through the kernel, streamed; aggregate tokens/s from the first submit to the last
    token, and time to first token (TTFT) p50/p99;
(d) the TTFT of a high-priority request (nice -10) when idle and with ``--long`` long
    generations running.

Targets (issue 6): (c)/(a) >= 6, (c)/(b) >= 0.8, TTFT under load <= 2x idle.

Run: ``.venv/bin/python bench/generation.py [--requests 16] [--tokens 64] [--stagger 0.05]
[--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmos import Client
from llmos.kernel.testing import KernelProcess, running_kernel

QUESTIONS = [
    "My parcel has not arrived yet. What should I do?", "How do I reset my password?",
    "Can I get a refund for a damaged item?", "What are your opening hours on Sunday?",
    "How can I change the delivery address of my order?", "Do you ship to Canada?",
    "My invoice shows the wrong amount. Can you help?", "How do I cancel my subscription?",
    "The app crashes when I log in. What can I do?", "Can I exchange shoes for a larger size?",
    "Is there a warranty on headphones?", "How long does a bank transfer refund take?",
    "Where can I find my order number?", "Can I pay with a gift card?",
    "Why was my card declined?", "How do I contact a human agent?",
]


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are a helpful customer service assistant."},
            {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


def hf_baselines(path: Path, requests: int, tokens: int) -> dict[str, float]:
    """(a) one at a time and (b) one static batch, tokens/s, with transformers generate."""
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "left"
    prompts = [tokenizer.apply_chat_template(messages(i), tokenize=False,
                                             add_generation_prompt=True) for i in range(requests)]
    options = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False}
    with torch.inference_mode():
        batch = tokenizer(prompts[:1], return_tensors="pt", add_special_tokens=False)
        model.generate(**batch, **{**options, "max_new_tokens": 4, "min_new_tokens": 4})  # warm
        started = time.perf_counter()
        for prompt in prompts:
            batch = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
            model.generate(**batch, **options)
        single = requests * tokens / (time.perf_counter() - started)
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        started = time.perf_counter()
        out = model.generate(**batch, **options)
        static = requests * tokens / (time.perf_counter() - started)
    assert out.shape[1] == batch["input_ids"].shape[1] + tokens
    return {"single_tok_s": single, "static_tok_s": static}


def llmos_run(kernel: KernelProcess, requests: int, tokens: int, stagger: float) -> dict[str, Any]:
    """(c): staggered concurrent streaming clients; aggregate tokens/s and TTFTs."""
    first_token: list[float] = []
    ends: list[float] = []
    produced: list[int] = []
    lock = threading.Lock()
    start = time.perf_counter()

    def one(i: int) -> None:
        time.sleep(i * stagger)
        with Client(kernel.address, name=f"bench-gen-{i}") as client:
            submitted = time.perf_counter()
            pending = client.submit("generate", {
                "model": "smollm2", "messages": messages(i), "max_tokens": tokens,
                "temperature": 0.0, "ignore_eos": True}, events=True)
            first = None
            for event in pending.stream():
                if event.event == "token" and first is None:
                    first = time.perf_counter() - submitted
            result = pending.result()
        with lock:
            first_token.append(first if first is not None else float("nan"))
            ends.append(time.perf_counter())
            produced.append(result["usage"]["completion_tokens"])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = max(ends) - start
    ttft = sorted(first_token)
    return {"tok_s": sum(produced) / elapsed, "tokens": sum(produced), "seconds": elapsed,
            "ttft_p50_ms": 1000 * statistics.median(ttft),
            "ttft_p99_ms": 1000 * ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))]}


def urgent_ttft(client: Client) -> float:
    """Seconds to the first token of one high-priority request."""
    submitted = time.perf_counter()
    pending = client.submit("generate", {"model": "smollm2", "messages": messages(3),
                                         "max_tokens": 4, "temperature": 0.0, "priority": -10},
                            events=True)
    first = next(time.perf_counter() - submitted for e in pending.stream() if e.event == "token")
    pending.result()
    return first


def priority_run(kernel: KernelProcess, long: int, repeats: int) -> dict[str, float]:
    """(d): TTFT of an urgent request idle, then with ``long`` long generations running."""
    with Client(kernel.address, name="bench-urgent") as client:
        idle = statistics.median(urgent_ttft(client) for _ in range(repeats))
        background = Client(kernel.address, name="bench-background")
        runs = [background.submit("generate", {"model": "smollm2", "messages": messages(i),
                                               "max_tokens": 4000, "ignore_eos": True,
                                               "temperature": 0.0}, events=True)
                for i in range(long)]
        for pending in runs:  # every long generation is decoding
            next(e for e in pending.stream() if e.event == "token")
        loaded = statistics.median(urgent_ttft(client) for _ in range(repeats))
        for pending in runs:
            client.cancel(pending.job_id())
        background.close()
    return {"idle_ttft_ms": 1000 * idle, "loaded_ttft_ms": 1000 * loaded,
            "ratio": loaded / idle}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--stagger", type=float, default=0.05, help="seconds between arrivals")
    parser.add_argument("--long", type=int, default=8, help="long generations for (d)")
    parser.add_argument("--repeats", type=int, default=7,
                        help="urgent requests idle and loaded (the medians are compared)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="llmos-bgen-"))
    with running_kernel(home, "--devices", "torch:cpu") as kernel:
        with Client(kernel.address, name="bench-setup", timeout=600) as client:
            client.import_model("smollm2")
            client.load("smollm2", max_seqs=max(args.requests, args.long + 1))
            path = Path(next(m["path"] for m in client.models() if m["model"] == "smollm2"))
        llmos_run(kernel, 2, 4, 0.0)  # warm the engine
        hf = hf_baselines(path, args.requests, args.tokens)
        runs = [llmos_run(kernel, args.requests, args.tokens, args.stagger) for _ in range(2)]
        best = max(runs, key=lambda r: r["tok_s"])
        priority = priority_run(kernel, args.long, args.repeats)
    report = {"requests": args.requests, "tokens": args.tokens, "stagger_s": args.stagger,
              **hf, "llmos": best, "llmos_runs_tok_s": [r["tok_s"] for r in runs],
              "vs_single": best["tok_s"] / hf["single_tok_s"],
              "vs_static": best["tok_s"] / hf["static_tok_s"], "priority": priority}
    print(f"(a) transformers one at a time : {hf['single_tok_s']:7.1f} tok/s")
    print(f"(b) transformers static batch  : {hf['static_tok_s']:7.1f} tok/s")
    each = ", ".join(f"{r['tok_s']:.1f}" for r in runs)
    print(f"(c) llmos, {args.requests} staggered clients: {best['tok_s']:7.1f} tok/s (runs: {each})")
    print(f"    (c)/(a) = {report['vs_single']:.2f}x (target 6)   "
          f"(c)/(b) = {report['vs_static']:.2f} (target 0.8)")
    print(f"    TTFT p50 {best['ttft_p50_ms']:.0f} ms, p99 {best['ttft_p99_ms']:.0f} ms")
    print(f"(d) urgent TTFT idle {priority['idle_ttft_ms']:.0f} ms, with {args.long} long "
          f"generations {priority['loaded_ttft_ms']:.0f} ms = {priority['ratio']:.2f}x (target <= 2)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
