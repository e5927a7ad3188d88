"""Plugin jobs in the driver host, run in quanta: the shared part of their sessions.

A compress or update job is a sequence of **phases**: a generator (:meth:`PhasedSession._work`)
that yields the name of the next phase each time one ends. Each task from the kernel runs
phases for about ``seconds`` (at least one) with the host's threads minus one, so a core
stays free for inference, and reports the progress; the job goes back to the kernel's
queue between quanta, so queued inference runs first. A write that fails in a phase (a full
disk, above all) fails the task with KernelError(INTERNAL) naming the file, and the job
ends: the kernel removes its folder.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from llmos.contract.protocol import KernelError
from llmos.kernel.registry import is_disk_full, write_error


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
        except Exception as exc:  # safetensors, torch, onnx say it without an OSError
            if isinstance(exc, KernelError) or not is_disk_full(exc):
                raise
            where = getattr(exc, "filename", None) or "the job's folder"
            raise write_error(f"the files of the {self.phase!r} phase", where, exc) from exc
        finally:
            torch.set_num_threads(inference_threads)
        return {"phase": self.phase, "done": self.done, **self._progress()}

    def _work(self) -> Iterator[str]:
        """Each ``yield`` ends a phase and names the next one."""
        raise NotImplementedError

    def _progress(self) -> dict[str, Any]:
        """The job's own progress fields (and its results once ``done``)."""
        raise NotImplementedError
