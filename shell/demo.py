"""The main job behind ``make demo``: a kernel, the bundled encoder, search, fine-tuning.

Starts a kernel in a fresh home, imports and loads MiniLM from its package, embeds a
customer-service question and a small knowledge base and ranks the answers by cosine
similarity; then fine-tunes MiniLM on the bundled movie reviews as a time-sliced kernel
job (3,000 rows, one epoch: a budget of a few minutes on 2 cores, with a progress line),
prints its test scores beside the majority class's (and a warning if it learned only the
class prior) and classifies new sentences with it. Last, it imports the bundled chat model
(SmolLM2, converted once from GGUF), asks it a customer's question and streams the
answer. The last act: drug reviews reach the movie-review classifier; monitoring flags
the drift, 300 labelled drug reviews arrive as feedback, and an update (LoRA with replay
and distillation) is trained, gated on both domains and promoted. Then it shows the jobs
table and stops the kernel. Exits 0 only if every step worked.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmos import Client
from llmos.contract.protocol import ErrorCode, KernelError
from llmos.data import load_dataset
from llmos.plugins.learning.shell import updated

from . import render, views
from .cli import start_detached, stop_kernel

QUESTION = "I forgot my password and cannot log in to my account."
KNOWLEDGE_BASE = [
    "To reset your password, click 'Forgot password' on the sign-in page.",
    "Refunds are issued to the original payment method within 5 business days.",
    "Our support team is available from 9am to 5pm, Monday to Friday.",
    "You can change the email address on your account in the profile settings.",
    "If your account is locked after failed log-ins, wait 15 minutes and try again.",
    "Shipping is free for orders over 50 euros.",
]
#: The customer's question for the chat model (greedy decoding: the same answer every run).
CHAT_QUESTION = "My order arrived damaged. What should I do?"
#: The demo's fine-tuning budget: 3,000 rows for one epoch (the defaults would run three:
#: docs/benchmarks.md, "Training defaults"); batch size and learning rate are the defaults.
TRAIN = {"model": "minilm", "data": "reviews", "name": "reviews", "limit": 3000, "epochs": 1.0,
         "max_tokens": 64}
#: The last act: labelled drug reviews sent as feedback, and the update they train.
FEEDBACK = 300
#: The gate is paired with a 95% bound (plugins/gate.py): the old domain is the whole
#: validation split, and 40% of the feedback is held out (120 reviews) so a real gain shows.
UPDATE = {"model": "reviews", "method": "lora", "limit": FEEDBACK, "max_tokens": 64,
          "holdout": 0.4, "params": {"epochs": 2.0}}
NEW_REVIEWS = ["A moving, beautifully acted film that stays with you.",
               "A tedious mess with a script that goes nowhere.",
               "Funny, warm and surprisingly smart.",
               "I wanted my two hours back."]


def run_demo() -> int:
    home = Path(tempfile.mkdtemp(prefix="llmos-demo-"))
    render.console.rule("llmos demo")
    started = time.perf_counter()
    record = start_detached(home, [])
    render.console.print(f"kernel pid {record['pid']} on {record['address']} "
                         f"(home {home}) up in {time.perf_counter() - started:.1f} s")
    try:
        with Client(record["address"], name="demo") as client:
            imported = client.import_model("minilm")
            render.console.print(f"imported minilm:{imported['version']} "
                                 f"(sha256 {imported['sha256'][:12]}...)")
            loaded = client.load("minilm")
            render.console.print(f"loaded {loaded['model']} ({loaded['parameters'] / 1e6:.1f}M "
                                 f"parameters, {loaded['dim']} dims) on {', '.join(loaded['devices'])}"
                                 ", each timed on 9 shapes; batches go to the fastest")
            vectors = client.embed("minilm", [QUESTION, *KNOWLEDGE_BASE])
            scores = vectors[1:] @ vectors[0]
            order = np.argsort(-scores)
            render.console.print(f"\n[bold]question:[/bold] {QUESTION}")
            render.show(views.table("answers ranked by cosine similarity",
                                    ["RANK", "SCORE", "ANSWER"],
                                    [(rank + 1, f"{scores[i]:.3f}", KNOWLEDGE_BASE[i])
                                     for rank, i in enumerate(order)]))
            trained = _fine_tune(client)
            render.console.print(f"\nfine-tuned {trained['model']} (parent {trained['parent']}) "
                                 f"on {TRAIN['limit']} reviews: test accuracy "
                                 f"{trained['metrics']['test']['accuracy']:.3f}, macro-F1 "
                                 f"{trained['metrics']['test']['macro_f1']:.3f} (majority "
                                 f"class {trained['metrics']['test']['majority_baseline']['accuracy']:.3f})")
            if trained["warning"]:
                render.show(views.message(f"{views.WARNING}{trained['warning']}"))
            client.load("reviews", driver="torch")
            predictions = client.classify("reviews", NEW_REVIEWS)
            render.show(views.classified(NEW_REVIEWS, {"predictions": predictions}))
            _chat(client)
            _learn(client)
            render.show(views.jobs(client.jobs()))
    finally:
        stop_kernel(record["address"])
    render.console.print(f"done in {time.perf_counter() - started:.1f} s; kernel stopped")
    return 0


def _chat(client: Client) -> None:
    """Import and load the chat model, then stream its answer to the customer's question."""
    started = time.perf_counter()
    imported = client.import_model("smollm2")
    loaded = client.load("smollm2")
    render.console.print(f"\nimported smollm2:{imported['version']} from its GGUF package and "
                         f"loaded it ({loaded['parameters'] / 1e6:.0f}M parameters, fp32) on "
                         f"{', '.join(loaded['devices'])} in {time.perf_counter() - started:.1f} s")
    render.console.print(f"[bold]customer:[/bold] {CHAT_QUESTION}")
    render.console.print("[bold]assistant:[/bold] ", end="")
    pending = client.submit("generate", {"model": "smollm2", "max_tokens": 80, "temperature": 0.0,
                                         "messages": [{"role": "user", "content": CHAT_QUESTION}]},
                            events=True)
    for event in pending.stream():
        if event.event == "token":
            render.stream(event.body["text"])
    result = pending.result()
    tokens = result["usage"]["completion_tokens"]
    render.console.print(f"\n({tokens} tokens, finish: {result['finish_reason']}, first token "
                         f"after {1000 * result['time_to_first_token']:.0f} ms)")


def _learn(client: Client) -> None:
    """The last act: drug reviews reach the movie-review classifier. Monitoring flags the
    drift, labelled feedback arrives, an update (LoRA, replay, distillation) is trained,
    gated on both domains and promoted; both versions are measured on the drug test file."""
    drugs = load_dataset("drugs")
    texts, targets = drugs.split("train")
    stream = drugs.split("validation")[0] + texts[FEEDBACK:]
    render.console.print(f"\n[bold]drug reviews arrive:[/bold] classifying {len(stream)} with "
                         "the movie-review model")
    for start in range(0, len(stream), 32):
        client.classify("reviews", stream[start:start + 32])
    stats = client.stats("reviews")
    alerts = ", ".join(a["kind"] for a in stats["alerts"]) or "none"
    render.console.print(f"monitor: input-length drift PSI {stats['drift']['input_length']:.2f}, "
                         f"confidence PSI {stats['drift']['confidence']:.2f}; alerts: {alerts}")
    client.learn("reviews", [{"text": t, "label": drugs.labels[y]}
                             for t, y in zip(texts[:FEEDBACK], targets[:FEEDBACK], strict=True)])
    result = _with_progress(client, "update", UPDATE,
                            f"{FEEDBACK} labelled drug reviews as feedback; update job")
    render.show(updated(result))
    scores = []
    for handle in (result["parent"], result["model"]):
        name, _, number = handle.rpartition(":")
        scores.append(client.evaluate(name, version=int(number), data="drugs",
                                      split="test")["accuracy"])
    render.console.print(f"drug reviews' own test file ({len(drugs.test_rows)} reviews): "
                         f"{result['parent']} {scores[0]:.3f} -> {result['model']} {scores[1]:.3f}")


def _fine_tune(client: Client) -> dict[str, Any]:
    """Run the train job with a live progress line (the job's own progress events)."""
    return _with_progress(client, "train", TRAIN,
                          "MiniLM on movie reviews (positive/negative); training job")


def _with_progress(client: Client, syscall: str, args: dict[str, Any], what: str) -> Any:
    """Submit a job and show its progress line until its result arrives."""
    pending = client.submit(syscall, args, events=True)
    job_id = pending.job_id()
    render.console.print(f"\n{what} {job_id}")
    while True:
        try:
            result = pending.result(timeout=1.0)
            break
        except KernelError as exc:
            if exc.code is not ErrorCode.TIMEOUT:
                raise
            render.progress(views.progress(client.job(job_id), time.time()))
    render.end_progress()
    return result
