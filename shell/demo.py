"""The main job behind ``make demo``: a kernel, the bundled encoder, search, fine-tuning.

Starts a kernel in a fresh home, imports and loads MiniLM from its package, embeds a
customer-service question and a small knowledge base and ranks the answers by cosine
similarity; then fine-tunes MiniLM on the bundled movie reviews as a time-sliced kernel
job (a budget of a few minutes on 2 cores, with a progress line), evaluates the new
version, classifies new sentences with it, shows the jobs table and stops the kernel.
Exits 0 only if every step worked.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmos.kernel.client import Client
from llmos.kernel.protocol import ErrorCode, KernelError

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
#: The demo's fine-tuning budget (the full run is in docs/benchmarks.md).
TRAIN = {"model": "minilm", "data": "reviews", "name": "reviews", "limit": 3000, "epochs": 1.0,
         "learning_rate": 1e-4, "max_tokens": 64}
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
                                 f"{trained['metrics']['test']['macro_f1']:.3f}")
            client.load("reviews", driver="torch")
            predictions = client.classify("reviews", NEW_REVIEWS)
            render.show(views.classified(NEW_REVIEWS, {"predictions": predictions}))
            render.show(views.jobs(client.jobs()))
    finally:
        stop_kernel(record["address"], home)
    render.console.print(f"done in {time.perf_counter() - started:.1f} s; kernel stopped")
    return 0


def _fine_tune(client: Client) -> dict[str, Any]:
    """Run the train job with a live progress line (the job's own progress events)."""
    pending = client.submit("train", TRAIN, events=True)
    job_id = pending.job_id()
    render.console.print(f"\ntraining job {job_id}: MiniLM on movie reviews (fresh/rotten)")
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
