"""Long-running jobs in the driver host, run in quanta: the session contract, and the
shared part of the phased sessions of plugin jobs.

A **session** is a job's state between quanta (:class:`Session`). A plugin's session class
(compress, update, data-parallel training) is named by qualname in the task
(``"package.module:Class"``, registered by the plugin through ``llmos_register_sessions``)
and imported here, in the driver host, by :func:`import_session`: drivers name no plugin.

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
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from llmos.contract.protocol import KernelError
from llmos.kernel.registry import is_disk_full, write_error

from .base import import_qualname


class Session(Protocol):
    """One job's state in the driver host between its quanta.

    Its class has ``start(spec, threads) -> Session`` (a classmethod): ``spec`` is the
    task's ``spec``, ``threads`` the host's. The driver calls :meth:`run` once per task and
    :meth:`close` when it forgets the job (done, failed or ended by the kernel).
    """

    @property
    def done(self) -> bool:
        """Whether the job's work is finished (the driver then forgets it)."""
        ...

    def run(self, seconds: float) -> dict[str, Any]:
        """Work for about ``seconds``; the progress, with the job's results once done."""
        ...

    def close(self) -> None:
        """Release what the session holds beyond memory (processes, sockets)."""
        ...


#: ``start(spec, threads)`` of a session class.
SessionStart = Callable[[dict[str, Any], int], Session]


def import_session(qualname: str) -> SessionStart:
    """``start`` of the session class named ``"package.module:Class"``."""
    cls = import_qualname(qualname)
    start = getattr(cls, "start", None)
    if not (isinstance(cls, type) and callable(start)):
        raise TypeError(f"{qualname} is not a llmos session class (it has no start)")
    return start


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

    def close(self) -> None:
        """Nothing beyond memory to release."""

    def _work(self) -> Iterator[str]:
        """Each ``yield`` ends a phase and names the next one."""
        raise NotImplementedError

    def _progress(self) -> dict[str, Any]:
        """The job's own progress fields (and its results once ``done``)."""
        raise NotImplementedError
