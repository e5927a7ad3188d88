"""The ``quantize`` step: int8 for OpenVINO (nncf), ONNX Runtime or torch; fp16 / bf16.

Runtime methods export the candidate's torch model to ONNX (with the drivers' exporter,
so inputs and outputs match what they serve), then quantize the graph; the candidate
becomes that graph (form ``onnx`` or ``openvino``). Calibrated methods use ``samples``
training rows, tokenized as the drivers do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .candidate import Candidate, StepContext
from .structure import record

#: Rows per calibration batch (ONNX Runtime and nncf both read one feed dict at a time).
_CALIBRATION_BATCH = 1


def quantize(candidate: Candidate, params: dict[str, Any], context: StepContext) -> Candidate:
    """Apply ``params["method"]`` (see :data:`llmos.plugins.compression.QUANTIZE_METHODS`)."""
    method = params["method"]
    candidate.require_torch(f"quantize method={method}")
    if method in ("fp16", "bf16"):
        candidate.model = candidate.model.to(torch.float16 if method == "fp16" else torch.bfloat16)
        return candidate
    if method == "torch-int8":
        record(candidate.model, torch_int8=True)
        return candidate
    onnx_path = export_onnx(candidate, context.workdir / "export")
    feeds = _calibration_feeds(candidate, context, params["samples"])
    if method.startswith("onnxruntime"):
        candidate.graph = _onnxruntime_int8(onnx_path, context.workdir, feeds,
                                            static=method.endswith("static"))
        candidate.form = "onnx"
    else:
        candidate.graph = _openvino_int8(onnx_path, context.workdir, feeds,
                                         weights_only=method.endswith("weights"))
        candidate.form = "openvino"
    candidate.notes.append({"calibration_rows": len(feeds) if "weights" not in method else 0})
    return candidate


def export_onnx(candidate: Candidate, folder: Path) -> Path:
    """The candidate's torch model as ONNX (the drivers' export of a saved copy)."""
    from llmos.drivers.export import ensure_artifact

    saved = folder / "model"
    candidate.save(saved)
    artifact, _ = ensure_artifact(saved, "onnx")
    return artifact


def _calibration_feeds(candidate: Candidate, context: StepContext,
                       samples: int) -> list[dict[str, np.ndarray]]:
    texts = context.calibration(samples)
    return [candidate.feeds(texts[i:i + _CALIBRATION_BATCH], context.max_tokens)
            for i in range(0, len(texts), _CALIBRATION_BATCH)]


def _onnxruntime_int8(onnx_path: Path, workdir: Path, feeds: list[dict[str, np.ndarray]],
                      static: bool) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    target = workdir / "model.int8.onnx"
    prepared = workdir / "model.pre.onnx"
    quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
    if not static:
        quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8)
        return target

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True)
    return target


def _openvino_int8(onnx_path: Path, workdir: Path, feeds: list[dict[str, np.ndarray]],
                   weights_only: bool) -> Path:
    import nncf
    import openvino

    model = openvino.convert_model(str(onnx_path))
    if weights_only:
        model = nncf.compress_weights(model)
    else:
        model = nncf.quantize(model, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(feeds))
    target = workdir / "openvino_model.xml"
    openvino.save_model(model, str(target), compress_to_fp16=False)
    return target
