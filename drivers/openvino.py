"""OpenVINO driver: the model's OpenVINO IR (converted from its ONNX export) on CPU or GPU.

Same tasks, inputs and outputs as the torch driver (see :mod:`llmos.drivers.common`).
Computes in exact fp32 by default: OpenVINO would otherwise pick bf16 on CPUs that have it.
Load option ``precision``: ``"f32"`` (default), ``"bf16"`` (~1e-2 error; slower than f32 on
CPUs without AMX), or ``"int8"``: the IR quantized by nncf post-training quantization
(weights and activations), calibrated on :data:`CALIBRATION_ROWS` training texts of the
dataset in option ``calibration`` (``{"name"}`` or ``{"path"}``), cached beside the IR per
dataset. The precision used is reported in the load reply. Devices: ``cpu``, ``gpu`` /
``gpu:N``. On CPU it grants streams (:meth:`OpenVinoDriver.use_streams`): OpenVINO's own
throughput mode, each stream an infer request on ``threads // streams`` pinned threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import openvino
import psutil

from llmos.contract.protocol import ErrorCode, KernelError

from .common import ExportedGraphDriver, Graph

PRECISIONS = ("f32", "bf16", "int8")
#: Texts an int8 quantization is calibrated on (at most), and how many go in one batch:
#: MiniLM's embeddings of 200 drug reviews against fp32 reach cosine min 0.9957 with 1,024
#: movie reviews, 0.9889 with 256.
CALIBRATION_ROWS = 1024
CALIBRATION_BATCH = 16


class OpenVinoDriver(ExportedGraphDriver):
    name = "openvino"
    artifact_format = "openvino"

    def __init__(self, device: str, threads: int) -> None:
        super().__init__(device, threads)
        kind, _, index = device.partition(":")
        if kind not in ("cpu", "gpu"):
            raise KernelError(ErrorCode.DEVICE_FAILED, f"openvino cannot drive {device}")
        self._core = openvino.Core()
        self._streams = 1
        self._target = kind.upper() + (f".{index}" if index else "")
        available = self._core.available_devices
        if self._target not in available and not (self._target == "GPU" and "GPU.0" in available):
            raise KernelError(ErrorCode.DEVICE_FAILED,
                              f"openvino sees no {self._target} (it has: {', '.join(available)})")

    def use_streams(self, streams: int) -> int:
        """On CPU up to one stream per thread (OpenVINO's NUM_STREAMS): batches on separate
        cores share no barriers, so one slowed by other work does not stall the rest."""
        if self._target == "CPU":
            self._streams = max(1, min(streams, self.threads))
        return self._streams

    def describe(self) -> dict[str, Any]:
        if self._target.startswith("GPU"):
            memory = self._core.get_property(self._target, "GPU_DEVICE_TOTAL_MEM_SIZE")
        else:
            memory = psutil.virtual_memory().total
        return {"device": self.device, "framework": f"openvino {version('openvino')}",
                "threads": self.threads, "memory_bytes": int(memory)}

    def open_graph(self, artifact: Path, options: dict[str, Any], tokenizer: Any) -> Graph:
        precision = options.get("precision", "f32")
        if precision not in PRECISIONS:
            raise KernelError(ErrorCode.BAD_REQUEST,
                              f"openvino precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        if precision == "int8":
            artifact = quantized(artifact, options.get("calibration"), tokenizer)
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32" if precision == "int8"
                                  else precision}  # int8 layers run int8; the rest exact
        if self._target == "CPU":
            config.update(INFERENCE_NUM_THREADS=self.threads, NUM_STREAMS=self._streams)
        compiled = self._core.compile_model(str(artifact), self._target, config)
        idle: queue.SimpleQueue[openvino.InferRequest] = queue.SimpleQueue()
        for _ in range(self._streams):
            idle.put(compiled.create_infer_request())

        def run(feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
            request = idle.get()  # one per stream; the outputs come back as copies
            try:
                result = request.infer(feeds)
            finally:
                idle.put(request)
            return {name: result[name] for name in outputs}

        used = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        return Graph(run=run, inputs=[i.get_any_name() for i in compiled.inputs],
                     outputs=[o.get_any_name() for o in compiled.outputs],
                     precision="int8" if precision == "int8" else used)


def quantized(artifact: Path, calibration: dict[str, str] | None, tokenizer: Any) -> Path:
    """The int8 IR of ``artifact`` calibrated on ``calibration`` (a dataset spec), made once
    and cached beside it (written under a temporary name, then renamed into place)."""
    if not calibration:
        raise KernelError(ErrorCode.BAD_REQUEST, "int8 needs calibration texts: load with "
                          "calibrate (a bundled dataset or a CSV/JSONL path)")
    spec = {**calibration, "rows": CALIBRATION_ROWS}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    target = artifact.with_name(f"int8-{key}.xml")
    if target.exists():
        return target
    import nncf  # heavy: only for a quantization

    from llmos.kernel import datasets

    texts = datasets.load(**calibration).split("train")[0][:CALIBRATION_ROWS]
    model = openvino.Core().read_model(str(artifact))
    names = {i.get_any_name() for i in model.inputs}
    batches = []
    for start in range(0, len(texts), CALIBRATION_BATCH):
        encoded = tokenizer(texts[start:start + CALIBRATION_BATCH], padding="longest",
                            truncation=True, max_length=128, return_tensors="np")
        batches.append({k: v.astype(np.int64) for k, v in encoded.items() if k in names})
    int8 = nncf.quantize(model, nncf.Dataset(batches), model_type=nncf.ModelType.TRANSFORMER,
                         subset_size=len(batches))
    with tempfile.TemporaryDirectory(dir=artifact.parent) as staging:
        openvino.save_model(int8, str(Path(staging) / "model.xml"), compress_to_fp16=False)
        os.replace(Path(staging) / "model.bin", target.with_suffix(".bin"))
        os.replace(Path(staging) / "model.xml", target)  # last: its presence means complete
    return target
