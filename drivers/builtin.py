"""Registers the built-in drivers through the same hook a third-party package uses.

Probes here are cheap (no heavy import): the framework itself is imported only in the
driver host that runs it.
"""

from __future__ import annotations

import glob
import importlib.util
from collections.abc import Callable

from llmos.contract.hookspecs import hookimpl
from llmos.kernel.registries import DriverRegistry, DriverSpec


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _torch_devices() -> list[str]:
    """``cpu``, plus ``cuda:N`` for each NVIDIA device node (torch confirms it in the host)."""
    if not _installed("torch"):
        return []
    gpus = sorted(glob.glob("/dev/nvidia[0-9]*"))
    return ["cpu", *(f"cuda:{i}" for i in range(len(gpus)))]


def _spec(name: str, qualname: str, module: str, description: str,
          devices: Callable[[], list[str]] | None = None, trains: bool = False,
          generates: bool = False) -> DriverSpec:
    """A driver needing ``module``: unavailable, with the reason, when it is not installed."""
    return DriverSpec(
        name=name, qualname=qualname, description=description,
        probe=devices or (lambda: ["cpu"] if _installed(module) else []),
        unavailable_reason=lambda: "" if _installed(module) else f"{module} is not installed",
        trains=trains, generates=generates,
    )


@hookimpl
def llmos_register_drivers(drivers: DriverRegistry) -> None:
    drivers.add(_spec("torch", "llmos.drivers.pytorch:TorchDriver", "torch",
                      "PyTorch eager on CPU and CUDA; trains; generates (continuous batching)",
                      _torch_devices, trains=True, generates=True))
    drivers.add(_spec("onnxruntime", "llmos.drivers.onnxruntime:OnnxRuntimeDriver", "onnxruntime",
                      "ONNX Runtime on the model's ONNX export (fp32)"))
    drivers.add(_spec("openvino", "llmos.drivers.openvino:OpenVinoDriver", "openvino",
                      "OpenVINO on the model's IR (fp32; load option precision=bf16)"))
