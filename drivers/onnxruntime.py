"""ONNX Runtime driver: the model's exported ONNX graph on CPU, or CUDA where the provider is.

Same tasks, inputs and outputs as the torch driver (see :mod:`llmos.drivers.common`); the
graph is exported on first load (:func:`llmos.drivers.export.ensure_artifact`) and computed in
fp32. Devices: ``cpu``, ``cuda`` / ``cuda:N`` (needs onnxruntime-gpu).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import psutil

from llmos.contract.protocol import ErrorCode, KernelError

from .common import ExportedGraphDriver, Graph


class OnnxRuntimeDriver(ExportedGraphDriver):
    name = "onnxruntime"
    artifact_format = "onnx"

    def __init__(self, device: str, threads: int) -> None:
        super().__init__(device, threads)
        self._providers: list[Any] = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                raise KernelError(ErrorCode.DEVICE_FAILED,
                                  f"onnxruntime has no CUDAExecutionProvider for {device} "
                                  "(install onnxruntime-gpu)")
            _, _, index = device.partition(":")
            self._providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(index or 0)}))
        elif device != "cpu":
            raise KernelError(ErrorCode.DEVICE_FAILED, f"onnxruntime cannot drive {device}")

    def describe(self) -> dict[str, Any]:
        """``memory_bytes`` is host memory: onnxruntime has no query for a GPU's."""
        return {"device": self.device, "framework": f"onnxruntime {onnxruntime.__version__}",
                "threads": self.threads, "memory_bytes": int(psutil.virtual_memory().total)}

    def open_graph(self, artifact: Path, options: dict[str, Any], tokenizer: Any) -> Graph:
        settings = onnxruntime.SessionOptions()
        settings.intra_op_num_threads = self.threads
        settings.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(artifact), settings, providers=self._providers)

        def run(feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
            return dict(zip(outputs, session.run(outputs, feeds), strict=True))

        return Graph(run=run, inputs=[i.name for i in session.get_inputs()],
                     outputs=[o.name for o in session.get_outputs()], precision="f32")
