"""Plugin jobs in the driver host, run in quanta: the shared part of their sessions.

A compress or update job is a sequence of **phases**: a generator (:meth:`PhasedSession._work`)
that yields the name of the next phase each time one ends. Each task from the kernel runs
phases for about ``seconds`` (at least one) with the host's threads minus one, so a core
stays free for inference, and reports the progress; the job goes back to the kernel's
queue between quanta, so queued inference runs first.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch


class PhasedSession:
    """One job's work as phases; subclasses write :meth:`_work` and :meth:`_progress`."""

    def __init__(self, threads: int) -> None:
        self.threads = max(1, threads - 1)  # one core stays free for inference elsewhere
        self.phase = "starting"
        self.done = False
        self.finished_phases = 0
        self._phases = self._work()

    def run(self, seconds: float) -> dict[str, Any]:
        """Run phases for about ``seconds`` (at least one); the progress so far."""
        inference_threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        started = time.perf_counter()
        try:
            ran = 0
            while not self.done and (ran == 0 or time.perf_counter() - started < seconds):
                self.phase = next(self._phases, "done")
                self.finished_phases += 1
                ran += 1
                self.done = self.phase == "done"
        finally:
            torch.set_num_threads(inference_threads)
        return {"phase": self.phase, "done": self.done, **self._progress()}

    def _work(self) -> Iterator[str]:
        """Each ``yield`` ends a phase and names the next one."""
        raise NotImplementedError

    def _progress(self) -> dict[str, Any]:
        """The job's own progress fields (and its results once ``done``)."""
        raise NotImplementedError
