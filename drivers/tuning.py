"""The driver side of the autotune: time a loaded model on representative shapes."""

from __future__ import annotations

import time

from .base import Driver

#: A word that is one token in WordPiece and BPE vocabularies alike.
_WORD = "hello"


def synthetic_batch(batch: int, tokens: int) -> list[str]:
    """``batch`` texts of about ``tokens`` tokens each (two are special tokens)."""
    return [" ".join([_WORD] * max(1, tokens - 2))] * batch


def time_shapes(driver: Driver, handle: str, shapes: list[list[int]], task: str = "embed",
                repeats: int = 3) -> dict[str, float]:
    """Fastest of ``repeats`` runs of ``driver.run``, in ms, per ``"BxT"`` shape.

    The minimum, not the median: other processes on the machine only ever add time, so
    the fastest run is the best estimate of what the driver itself costs. One warm-up run
    first (lazy initialisation, kernel compilation).
    """
    driver.run(handle, task, synthetic_batch(1, 16), {})
    timings: dict[str, float] = {}
    for batch, tokens in shapes:
        inputs = synthetic_batch(batch, tokens)
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            driver.run(handle, task, inputs, {})
            samples.append((time.perf_counter() - started) * 1000)
        timings[f"{batch}x{tokens}"] = round(min(samples), 3)
    return timings
