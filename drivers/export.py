"""Model export: a model version's weights as an ONNX graph or an OpenVINO IR, cached on disk.

Layout inside a model folder (a registry version directory)::

    artifacts/.lock                   flock held while an artifact is built
    artifacts/onnx/model.onnx         + meta.json
    artifacts/openvino/model.xml      + model.bin, meta.json

An artifact is reused only while its ``meta.json`` records the sha256 of the folder's
``*.safetensors`` files and the versions of the code that exported it; otherwise it is rebuilt.
Builds are written into a temporary folder next to the artifact and renamed into place, so a
reader never sees half an artifact. The ONNX graph takes ``input_ids`` and ``attention_mask``
(int64, dynamic batch and sequence axes) and returns ``last_hidden_state`` (the base model's
output), plus ``logits`` for ``*ForSequenceClassification`` models. The OpenVINO IR is
converted from the ONNX graph and kept in exact fp32.

Heavy frameworks are imported only inside the builders. The kernel runs the CLI as a subprocess
(``python -m llmos.drivers.export MODEL_DIR --to onnx``) so that it never imports torch itself.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

from llmos.contract.protocol import ErrorCode, KernelError
from llmos.kernel.registry import digest_files, writing

#: Artifact file name per format.
FORMATS: dict[str, str] = {"onnx": "model.onnx", "openvino": "model.xml"}
#: Graph file a version folder may carry instead of safetensors (made by ``compress``), with
#: a ``meta.json`` beside it; used as the artifact as it is.
PREBUILT: dict[str, str] = {"onnx": "model.onnx", "openvino": "openvino_model.xml"}
#: Bump when the export code changes what it writes: existing artifacts are then rebuilt.
EXPORT_VERSION = 1
ONNX_OPSET = 17
META = "meta.json"
#: Largest difference between torch and the exported ONNX graph accepted at export time.
EXPORT_TOLERANCE = 1e-3


def artifact_dir(model_dir: Path, fmt: str) -> Path:
    """The folder holding the ``fmt`` artifact of the model in ``model_dir``."""
    return Path(model_dir) / "artifacts" / fmt


def read_meta(artifact: Path) -> dict[str, Any]:
    """The ``meta.json`` beside an artifact file: format, sha256, exporter, parameters."""
    return json.loads((artifact.parent / META).read_text())


def ensure_artifact(model_dir: Path, fmt: str) -> tuple[Path, bool]:
    """Path to the up-to-date ``fmt`` artifact of ``model_dir``, and whether it was built now.

    ``fmt`` is ``"onnx"`` or ``"openvino"`` (anything else: KernelError BAD_REQUEST); a folder
    without config.json or safetensors weights: NOT_FOUND / BAD_REQUEST. Safe to call from
    several processes at once: one builds, the others wait and reuse its result.
    """
    if fmt not in FORMATS:
        raise KernelError(ErrorCode.BAD_REQUEST,
                          f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    model_dir = Path(model_dir)
    prebuilt = model_dir / PREBUILT[fmt]
    if prebuilt.is_file():  # a compressed version that is this runtime's graph
        return prebuilt, False
    expected = _expected_meta(model_dir, fmt)
    target = artifact_dir(model_dir, fmt)
    artifact = target / FORMATS[fmt]
    if _is_current(artifact, expected):
        return artifact, False
    if fmt == "openvino":  # before taking the lock: flock does not nest within one process
        ensure_artifact(model_dir, "onnx")
    root = target.parent
    root.mkdir(exist_ok=True)
    with _locked(root / ".lock"):
        if _is_current(artifact, expected):  # another process built it while we waited
            return artifact, False
        for leftover in root.glob(f".{fmt}-*"):  # a crashed build's, since we hold the lock
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{fmt}-new-", dir=root))
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the artifact from other users
        try:
            with writing(f"the {fmt} export of {model_dir}", target):  # e.g. a full disk
                parameters = _BUILDERS[fmt](model_dir, staging)
                (staging / META).write_text(json.dumps({**expected, "parameters": parameters}))
            if target.exists():
                stale = Path(tempfile.mkdtemp(prefix=f".{fmt}-old-", dir=root))
                target.rename(stale / fmt)
                staging.rename(target)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return artifact, True


def _expected_meta(model_dir: Path, fmt: str) -> dict[str, Any]:
    if not (model_dir / "config.json").is_file():
        raise KernelError(ErrorCode.NOT_FOUND, f"{model_dir} is not a model folder (no config.json)")
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise KernelError(ErrorCode.BAD_REQUEST, f"{model_dir} has no .safetensors weights to export")
    exporter = {"llmos": EXPORT_VERSION, "torch": version("torch"),
                "transformers": version("transformers")}
    if fmt == "openvino":
        exporter["openvino"] = version("openvino")
    return {"format": fmt, "sha256": digest_files(weights), "exporter": exporter}


def _is_current(artifact: Path, expected: dict[str, Any]) -> bool:
    if not artifact.is_file():
        return False
    try:
        meta = read_meta(artifact)
    except (OSError, ValueError):
        return False
    return all(meta.get(key) == value for key, value in expected.items())


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _export_onnx(model_dir: Path, staging: Path) -> int:
    """Write ``staging/model.onnx``, check it against torch in onnxruntime; the parameter count.

    Uses the TorchScript exporter (``dynamo=False``) on a wrapper with an explicit
    ``forward(input_ids, attention_mask)``: in torch 2.13 it takes ~2 s for MiniLM where the
    dynamo exporter takes ~7 s and needs the onnxscript package.
    """
    import numpy as np
    import onnxruntime
    import torch

    from .pytorch import is_classifier, load_hf

    class Graph(torch.nn.Module):
        """``forward(input_ids, attention_mask)`` -> (last_hidden_state[, logits])."""

        def __init__(self, model: torch.nn.Module, classifier: bool) -> None:
            super().__init__()
            self.model, self.classifier = model, classifier
            self.encoder = getattr(model, model.base_model_prefix, model)
            # A classifier runs once; its base model's output is caught on the way.
            self._hidden: list[torch.Tensor] = []
            if classifier:
                self.encoder.register_forward_hook(
                    lambda _module, _args, out: self._hidden.append(out.last_hidden_state))

        def forward(self, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
            if not self.classifier:
                return (self.encoder(input_ids=input_ids, attention_mask=attention_mask)
                        .last_hidden_state,)
            self._hidden.clear()
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            return self._hidden[0], logits

    model, tokenizer = load_hf(str(model_dir))
    classifier = is_classifier(model.config)
    graph = Graph(model, classifier).eval()
    # Padded on purpose: a sample without padding could let the model skip its mask.
    sample = tokenizer(["a short sample", "a longer sample sentence, so the first one is padded"],
                       padding="longest", return_tensors="pt")
    inputs = (sample["input_ids"], sample["attention_mask"])
    outputs = ["last_hidden_state", "logits"] if classifier else ["last_hidden_state"]
    axes = {name: {0: "batch", 1: "sequence"}
            for name in ("input_ids", "attention_mask", "last_hidden_state")}
    if classifier:
        axes["logits"] = {0: "batch"}
    path = staging / FORMATS["onnx"]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter's notice
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # Indices here come from arange (never negative); the check below guards the result.
        warnings.filterwarnings("ignore", message="Exporting aten::index operator")
        expected = [t.numpy() for t in graph(*inputs)]
        torch.onnx.export(graph, inputs, str(path), dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=outputs,
                          dynamic_axes=axes, opset_version=ONNX_OPSET)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(outputs, {"input_ids": inputs[0].numpy(), "attention_mask": inputs[1].numpy()})
    error = max(float(np.abs(g - e).max()) for g, e in zip(got, expected, strict=True))
    if error > EXPORT_TOLERANCE:
        raise KernelError(ErrorCode.INTERNAL,
                          f"the ONNX export of {model_dir} differs from torch by {error:.2g}")
    return sum(p.numel() for p in model.parameters())


def _export_openvino(model_dir: Path, staging: Path) -> int:
    """Convert the (current) ONNX artifact to ``staging/model.xml`` in fp32; the parameter count."""
    import openvino

    onnx_artifact = artifact_dir(model_dir, "onnx") / FORMATS["onnx"]
    model = openvino.convert_model(str(onnx_artifact))
    openvino.save_model(model, str(staging / FORMATS["openvino"]), compress_to_fp16=False)
    return int(read_meta(onnx_artifact)["parameters"])


_BUILDERS: dict[str, Callable[[Path, Path], int]] = {
    "onnx": _export_onnx, "openvino": _export_openvino,
}


def main(argv: list[str] | None = None) -> int:
    """CLI: print ``{"path", "created", "seconds"}`` as one JSON line; exit 2 on KernelError."""
    parser = argparse.ArgumentParser(prog="llmos.drivers.export",
                                     description="Export a model folder to ONNX or OpenVINO IR.")
    parser.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    parser.add_argument("--to", required=True, metavar="FORMAT", help=" or ".join(FORMATS))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON line
            path, created = ensure_artifact(args.model_dir, args.to)
    except KernelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"path": str(path), "created": created,
                      "seconds": round(time.perf_counter() - start, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
