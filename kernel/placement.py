"""Placement: where a batch runs fastest, and whether a model fits in memory.

When a model is loaded without naming a driver, every available driver host loads it and
times a grid of representative shapes (:data:`TUNE_SHAPES`: batch size x tokens). The
timings are cached per model version and machine in the registry, so the autotune runs
once. Each batch then goes to the host with the lowest predicted time for its shape.
"""

from __future__ import annotations

import bisect
import json
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from llmos.contract.protocol import ErrorCode, KernelError

from .devices import hardware_of
from .jobs import Job

if TYPE_CHECKING:
    from .devices import DeviceHost
    from .registry import ModelVersion

BATCH_BUCKETS = (1, 8, 32)
TOKEN_BUCKETS = (16, 64, 128)
#: Shapes each driver times at load (batch size, tokens per input).
TUNE_SHAPES = tuple((b, t) for b in BATCH_BUCKETS for t in TOKEN_BUCKETS)
#: Resident memory per byte of weights on disk (weights, activations, framework overhead).
MEMORY_PER_WEIGHT_BYTE = 1.5
#: Share of a hardware's memory that loaded models may use (CPU: of RAM).
MEMORY_FRACTION = 0.8


def shape_key(batch: int, tokens: int) -> str:
    return f"{batch}x{tokens}"


def estimate_tokens(text: str) -> int:
    """Tokens of a text without a tokenizer (WordPiece/BPE average ~4 characters a token)."""
    return len(text) // 4 + 2


def batch_shape(jobs: list[Job]) -> tuple[int, int]:
    """(inputs, longest input in estimated tokens) of the batch these jobs would form."""
    texts = [text for job in jobs for text in job.args.get("inputs", [])]
    return len(texts), max((estimate_tokens(t) for t in texts), default=1)


def _bucket(buckets: tuple[int, ...], value: int) -> tuple[int, float]:
    """The smallest bucket >= value, or the largest with a linear scale factor beyond it."""
    index = bisect.bisect_left(buckets, value)
    if index < len(buckets):
        return buckets[index], 1.0
    return buckets[-1], value / buckets[-1]


@dataclass(slots=True)
class CostModel:
    """Measured milliseconds per (model handle, host) and shape."""

    timings: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)

    def record(self, handle: str, host: str, timings: dict[str, float]) -> None:
        self.timings[(handle, host)] = dict(timings)

    def forget(self, handle: str, host: str) -> None:
        self.timings.pop((handle, host), None)

    def predict(self, handle: str, host: str, batch: int, tokens: int) -> float:
        """Predicted ms for a batch; +inf when this host was never timed for the model."""
        table = self.timings.get((handle, host))
        if not table:
            return float("inf")
        b, b_scale = _bucket(BATCH_BUCKETS, batch)
        t, t_scale = _bucket(TOKEN_BUCKETS, tokens)
        measured = table.get(shape_key(b, t))
        return float("inf") if measured is None else measured * b_scale * t_scale


def machine_id(precision: str, threads: int, streams: int = 1) -> str:
    """What tuning results are valid for: machine, processor, CPUs, precision, threads (and
    streams, when a host runs several batches at once on a share of its threads each)."""
    cpu = platform.processor() or platform.machine()
    tail = f"/{streams}streams" if streams > 1 else ""
    return f"{platform.node()}/{cpu}/{os.cpu_count()}cpus/{precision}/{threads}threads{tail}"


def weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def memory_need(model_dir: Path) -> int:
    """Estimated resident bytes one driver needs to serve the model in ``model_dir``."""
    return int(weights_bytes(model_dir) * MEMORY_PER_WEIGHT_BYTE)


def is_generative(model_dir: Path) -> bool:
    """True for a causal language model (its config names a ``*ForCausalLM`` class)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return any(str(a).endswith("ForCausalLM") for a in config.get("architectures") or [])


def check_memory(version: ModelVersion, targets: list[DeviceHost], hosts: Iterable[DeviceHost],
                 budget: int | None) -> int:
    """Bytes a load of ``version`` onto ``targets`` needs per host; KernelError(BUSY) if a
    hardware would overflow its budget (``budget`` bytes when set, else
    :data:`MEMORY_FRACTION` of its memory) counting what ``hosts`` already hold."""
    hosts = list(hosts)
    need = memory_need(version.path)  # lanes (replicas) share their hardware's memory
    for hardware in {hardware_of(h.device) for h in targets}:
        adding = need * sum(1 for h in targets if hardware_of(h.device) == hardware)
        used = sum(p.get("memory", 0) for h in hosts
                   if hardware_of(h.device) == hardware for p in h.wanted.values())
        limit = budget if budget is not None else _memory_budget(hardware, hosts)
        if used + adding > limit:
            raise KernelError(
                ErrorCode.BUSY,
                f"loading {version.ref} needs ~{adding / 2**20:.0f} MiB on {hardware}, "
                f"{used / 2**20:.0f} MiB of its {limit / 2**20:.0f} MiB budget are in use; "
                "unload a model or load onto fewer drivers (--driver)")
    return need


def _memory_budget(hardware: str, hosts: list[DeviceHost]) -> int:
    if hardware == "cpu":
        return int(psutil.virtual_memory().total * MEMORY_FRACTION)
    memory = max(int(h.info.get("memory_bytes", 0)) for h in hosts
                 if hardware_of(h.device) == hardware)
    return int(memory * MEMORY_FRACTION)
