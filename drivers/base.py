"""The Driver contract: what a device driver implements to run inside a driver host.

A driver instance serves one device (``"cpu"``, ``"cuda:0"``, ...) in one worker process.
The host calls these methods from a single compute thread, one at a time (except
:meth:`Driver.run` on a driver that granted streams: :meth:`Driver.use_streams`). Errors
meant for the caller are raised as ``KernelError`` with a code; anything else fails the
batch with INTERNAL and the host keeps running.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmos.contract.protocol import ErrorCode, KernelError


@dataclass(slots=True)
class LoadedModel:
    """What a driver reports after loading a model version."""

    #: Tasks this model can run, e.g. ``["embed", "classify"]``.
    tasks: list[str]
    #: Class labels for ``classify`` (index order), empty if none.
    labels: list[str] = field(default_factory=list)
    #: Embedding width for ``embed``, 0 if none.
    dim: int = 0
    #: Longest input in tokens; longer inputs are truncated.
    max_tokens: int = 0
    parameters: int = 0
    #: Precision the model computes in, e.g. ``"f32"`` or ``"bf16"``.
    precision: str = "f32"


@dataclass(slots=True)
class TaskOutput:
    """Row-aligned outputs of a batch: every array's first axis is the input index."""

    arrays: dict[str, np.ndarray]
    #: Tokens processed (after truncation), for accounting.
    tokens: int = 0


class Driver(ABC):
    """One device, driven by one framework."""

    def __init__(self, device: str, threads: int) -> None:
        self.device = device
        self.threads = threads

    def use_streams(self, streams: int) -> int:
        """Asked once, before any load, to run up to ``streams`` :meth:`run` calls at once
        (from as many threads), splitting its threads among them; returns how many it will.
        The default, 1, keeps every call on the compute thread, one at a time."""
        return 1

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Capacity and identity: at least ``{"device", "framework", "memory_bytes"}``."""

    @abstractmethod
    def load(self, handle: str, path: str, options: dict[str, Any]) -> LoadedModel:
        """Load the model folder at ``path`` under ``handle`` (e.g. ``"minilm:1"``)."""

    @abstractmethod
    def unload(self, handle: str) -> None:
        """Free a loaded model; unknown handles are ignored."""

    @abstractmethod
    def run(self, handle: str, task: str, inputs: list[str], options: dict[str, Any]) -> TaskOutput:
        """Run ``task`` on a batch of ``inputs`` with the model loaded under ``handle``."""

    def run_stage(self, handle: str, task: str, arrays: dict[str, np.ndarray],
                  options: dict[str, Any]) -> TaskOutput:
        """Pipeline stages after the first: continue ``task`` from the previous stage's
        activations ``arrays`` (see llmos.plugins.parallel.stage)."""
        raise KernelError(ErrorCode.BAD_REQUEST, f"the {type(self).__name__} driver is no pipeline stage")

    def train(self, job: str, spec: dict[str, Any], seconds: float) -> dict[str, Any]:
        """Run one quantum (about ``seconds``) of training job ``job``; returns progress, and
        when the job is done also ``metrics`` and the saved model's ``output`` folder."""
        raise KernelError(ErrorCode.BAD_REQUEST, f"the {type(self).__name__} driver cannot train")

    def run_session(self, job: str, session: str, spec: dict[str, Any],
                    seconds: float) -> dict[str, Any]:
        """Run about ``seconds`` of job ``job`` as a plugin's session: an instance of the
        class named ``session`` (``"package.module:Class"``, a
        :class:`~llmos.drivers.sessions.Session`), started from ``spec`` on the first
        quantum and kept between quanta until it is done, fails or is forgotten. Returns its
        progress (with its results once done). The kernel sends compress and update jobs,
        and data-parallel training, this way; the driver knows none of them."""
        raise KernelError(ErrorCode.BAD_REQUEST,
                          f"the {type(self).__name__} driver cannot run sessions ({session})")

    def forget(self, job: str) -> None:  # noqa: B027 (optional: only trainers keep state)
        """Drop the in-memory state of job ``job`` (a training or a session)."""

    def evaluate(self, path: str, data: dict[str, str], split: str, seed: int) -> dict[str, Any]:
        """Accuracy, macro-F1 and confusion matrix of the classifier in ``path``."""
        raise KernelError(ErrorCode.BAD_REQUEST, f"the {type(self).__name__} driver cannot evaluate")

    # --- generation (optional; see drivers/generation.py for the events) -------------------

    def generate(self, handle: str, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Start generating for ``requests`` (each has an ``id``) with the causal LM loaded
        under ``handle``; return at once. Requests refused on the spot get a finish event
        with reason ``error``, a ``code`` and a ``message``."""
        raise KernelError(ErrorCode.BAD_REQUEST, f"the {type(self).__name__} driver cannot generate")

    @property
    def generating(self) -> bool:
        """Whether :meth:`step` has work (the host then polls instead of blocking)."""
        return False

    def step(self) -> list[dict[str, Any]]:
        """Advance every running generation by one token; the events."""
        return []

    def cancel(self, ids: list[int]) -> list[dict[str, Any]]:
        """Stop these generations wherever they are; their finish events."""
        return []

    def reprioritize(self, seq_id: int, priority: int) -> None:  # noqa: B027 (optional)
        """A running generation's new nice value."""


def import_qualname(qualname: str) -> Any:
    """The object named ``"package.module:name"``: what plugins name for the driver host to
    import (a driver class, a session class, a model loader), so that the kernel never
    imports it and drivers never import plugins."""
    module_name, _, name = qualname.partition(":")
    return getattr(importlib.import_module(module_name), name)


def granted_streams(driver: Driver, asked: int) -> int:
    """How many ``run`` calls ``driver`` takes at once when ``asked`` for that many: what
    :meth:`Driver.use_streams` grants, kept between 1 and ``asked`` (1 without asking)."""
    return max(1, min(asked, driver.use_streams(asked))) if asked > 1 else 1


def check_task(handle: str, info: LoadedModel | None, task: str, device: str) -> LoadedModel:
    """``info`` if the model is loaded and can run ``task``; KernelError otherwise."""
    if info is None:
        raise KernelError(ErrorCode.NOT_FOUND, f"{handle} is not loaded on {device}")
    if task not in info.tasks:
        raise KernelError(
            ErrorCode.BAD_REQUEST,
            f"{handle} cannot {task} (it can: {', '.join(info.tasks)}); "
            "classify needs a model with a classification head")
    return info
