"""Registers the built-in drivers through the same hook a third-party package uses.

Probes here are cheap (no heavy import): the framework itself is imported only in the
driver host that runs it.
"""

from __future__ import annotations

import glob
import importlib.util

from llmos.kernel import hookimpl
from llmos.kernel.registries import DriverRegistry, DriverSpec


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _torch_devices() -> list[str]:
    """``cpu``, plus ``cuda:N`` for each NVIDIA device node (torch confirms it in the host)."""
    if not _installed("torch"):
        return []
    gpus = sorted(glob.glob("/dev/nvidia[0-9]*"))
    return ["cpu", *(f"cuda:{i}" for i in range(len(gpus)))]


@hookimpl
def llmos_register_drivers(drivers: DriverRegistry) -> None:
    drivers.add(DriverSpec(
        name="torch",
        qualname="llmos.drivers.pytorch:TorchDriver",
        probe=_torch_devices,
        description="PyTorch eager on CPU and CUDA",
        unavailable_reason=lambda: "" if _installed("torch") else "torch is not installed",
    ))
    drivers.add(DriverSpec(
        name="onnxruntime",
        qualname="llmos.drivers.onnxruntime:OnnxRuntimeDriver",
        probe=lambda: ["cpu"] if _installed("onnxruntime") else [],
        description="ONNX Runtime on the model's ONNX export (fp32)",
        unavailable_reason=lambda: "" if _installed("onnxruntime") else "onnxruntime is not installed",
    ))
    drivers.add(DriverSpec(
        name="openvino",
        qualname="llmos.drivers.openvino:OpenVinoDriver",
        probe=lambda: ["cpu"] if _installed("openvino") else [],
        description="OpenVINO on the model's IR (fp32; load option precision=bf16)",
        unavailable_reason=lambda: "" if _installed("openvino") else "openvino is not installed",
    ))
