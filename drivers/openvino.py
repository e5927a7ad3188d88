"""OpenVINO driver: the model's OpenVINO IR (converted from its ONNX export) on CPU or GPU.

Same tasks, inputs and outputs as the torch driver (see :mod:`llmos.drivers.common`).
Computes in exact fp32 by default: OpenVINO would otherwise pick bf16 on CPUs that have it.
Load option ``precision``: ``"f32"`` (default) or ``"bf16"`` (faster, ~1e-2 error); the
precision OpenVINO actually uses is reported in the load reply. Devices: ``cpu``, ``gpu`` /
``gpu:N``.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import openvino
import psutil

from llmos.kernel.protocol import ErrorCode, KernelError

from .common import ExportedGraphDriver, Graph

PRECISIONS = ("f32", "bf16")


class OpenVinoDriver(ExportedGraphDriver):
    name = "openvino"
    artifact_format = "openvino"

    def __init__(self, device: str, threads: int) -> None:
        super().__init__(device, threads)
        kind, _, index = device.partition(":")
        if kind not in ("cpu", "gpu"):
            raise KernelError(ErrorCode.DEVICE_FAILED, f"openvino cannot drive {device}")
        self._core = openvino.Core()
        self._target = kind.upper() + (f".{index}" if index else "")
        available = self._core.available_devices
        if self._target not in available and not (self._target == "GPU" and "GPU.0" in available):
            raise KernelError(ErrorCode.DEVICE_FAILED,
                              f"openvino sees no {self._target} (it has: {', '.join(available)})")

    def describe(self) -> dict[str, Any]:
        if self._target.startswith("GPU"):
            memory = self._core.get_property(self._target, "GPU_DEVICE_TOTAL_MEM_SIZE")
        else:
            memory = psutil.virtual_memory().total
        return {"device": self.device, "framework": f"openvino {version('openvino')}",
                "threads": self.threads, "memory_bytes": int(memory)}

    def open_graph(self, artifact: Path, options: dict[str, Any]) -> Graph:
        precision = options.get("precision", "f32")
        if precision not in PRECISIONS:
            raise KernelError(ErrorCode.BAD_REQUEST,
                              f"openvino precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision}
        if self._target == "CPU":
            config["INFERENCE_NUM_THREADS"] = self.threads
        compiled = self._core.compile_model(str(artifact), self._target, config)

        def run(feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
            result = compiled.create_infer_request().infer(feeds)
            return {name: result[name] for name in outputs}

        return Graph(run=run, inputs=[i.get_any_name() for i in compiled.inputs],
                     outputs=[o.get_any_name() for o in compiled.outputs],
                     precision=compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())
