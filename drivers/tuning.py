"""The driver side of the autotune: time a loaded model on representative shapes."""

from __future__ import annotations

import statistics
import time

from .base import Driver

#: A word that is one token in WordPiece and BPE vocabularies alike.
_WORD = "hello"


def synthetic_batch(batch: int, tokens: int) -> list[str]:
    """``batch`` texts of about ``tokens`` tokens each (two are special tokens)."""
    return [" ".join([_WORD] * max(1, tokens - 2))] * batch


def time_shapes(driver: Driver, handle: str, shapes: list[list[int]], task: str = "embed",
                repeats: int = 3) -> dict[str, float]:
    """Median milliseconds of ``driver.run`` per ``"BxT"`` shape, after one warm-up run each."""
    timings: dict[str, float] = {}
    for batch, tokens in shapes:
        inputs = synthetic_batch(batch, tokens)
        driver.run(handle, task, inputs, {})
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            driver.run(handle, task, inputs, {})
            samples.append((time.perf_counter() - started) * 1000)
        timings[f"{batch}x{tokens}"] = round(statistics.median(samples), 3)
    return timings
