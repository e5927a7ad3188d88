"""Export artifacts: built once, reused while the weights stay the same, rebuilt when they change."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnxruntime
import openvino
import pytest
from safetensors.numpy import load_file, save_file

from llmos import ErrorCode, KernelError
from llmos.drivers.export import artifact_dir, ensure_artifact, read_meta
from llmos.kernel.registry import digest_files


@pytest.fixture(scope="module")
def exported(classifier_dir: Path) -> dict[str, tuple[Path, bool]]:
    """The tiny classifier exported to both formats: format -> (artifact, created)."""
    return {fmt: ensure_artifact(classifier_dir, fmt) for fmt in ("onnx", "openvino")}


def test_artifacts_are_built_then_reused(classifier_dir, exported):
    assert exported == {"onnx": (classifier_dir / "artifacts" / "onnx" / "model.onnx", True),
                        "openvino": (classifier_dir / "artifacts" / "openvino" / "model.xml", True)}
    for fmt, (path, _) in exported.items():
        assert path.is_file() and path.parent == artifact_dir(classifier_dir, fmt)
        assert ensure_artifact(classifier_dir, fmt) == (path, False)
        meta = read_meta(path)
        assert meta["format"] == fmt and meta["parameters"] > 0
        assert meta["sha256"] == digest_files(sorted(classifier_dir.glob("*.safetensors")))


def test_changed_weights_rebuild_the_artifact(classifier_dir, exported, tmp_path, copy_model_files):
    copy = copy_model_files(classifier_dir, tmp_path / "changed")
    shutil.copytree(classifier_dir / "artifacts", copy / "artifacts")
    assert ensure_artifact(copy, "onnx")[1] is False  # same weights: the copied artifact is current
    (copy / "artifacts" / ".onnx-new-crashed").mkdir()  # what a killed export leaves
    weights = load_file(copy / "model.safetensors")
    weights["classifier.bias"] = weights["classifier.bias"] + 1.0
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    old_graph = (copy / "artifacts" / "onnx" / "model.onnx").read_bytes()

    path, created = ensure_artifact(copy, "openvino")
    assert created and path == copy / "artifacts" / "openvino" / "model.xml"
    onnx_path = copy / "artifacts" / "onnx" / "model.onnx"
    assert ensure_artifact(copy, "onnx") == (onnx_path, False)  # rebuilt on the way
    assert onnx_path.read_bytes() != old_graph
    new_digest = digest_files([copy / "model.safetensors"])
    assert read_meta(onnx_path)["sha256"] == read_meta(path)["sha256"] == new_digest
    assert sorted(p.name for p in (copy / "artifacts").iterdir()) == [".lock", "onnx", "openvino"]


def test_concurrent_callers_export_once(classifier_dir, tmp_path, copy_model_files):
    copy = copy_model_files(classifier_dir, tmp_path / "fresh")
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: ensure_artifact(copy, "onnx"), range(2)))
    assert sorted(created for _, created in results) == [False, True]
    assert results[0][0] == results[1][0]


def test_the_onnx_graph_has_dynamic_axes_and_named_outputs(exported):
    session = onnxruntime.InferenceSession(str(exported["onnx"][0]),
                                           providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [
        ("input_ids", ["batch", "sequence"]), ("attention_mask", ["batch", "sequence"])]
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state", "logits"]


def test_the_openvino_ir_keeps_fp32_weights(exported):
    model = openvino.Core().read_model(str(exported["openvino"][0]))
    constants = {op.get_element_type().get_type_name() for op in model.get_ops()
                 if op.get_type_name() == "Constant"}
    assert "f32" in constants and "f16" not in constants


def test_bad_formats_and_folders_are_refused(classifier_dir, tmp_path):
    with pytest.raises(KernelError) as unknown:
        ensure_artifact(classifier_dir, "tflite")
    assert unknown.value.code is ErrorCode.BAD_REQUEST and "onnx, openvino" in unknown.value.message
    with pytest.raises(KernelError) as missing:
        ensure_artifact(tmp_path / "nowhere", "onnx")
    assert missing.value.code is ErrorCode.NOT_FOUND
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(KernelError) as no_weights:
        ensure_artifact(tmp_path, "onnx")
    assert no_weights.value.code is ErrorCode.BAD_REQUEST and ".safetensors" in no_weights.value.message


def test_the_cli_prints_one_json_line(classifier_dir, exported):
    command = [sys.executable, "-m", "llmos.drivers.export", str(classifier_dir)]
    done = subprocess.run([*command, "--to", "openvino"], capture_output=True, text=True, check=True)
    assert len(done.stdout.splitlines()) == 1
    reply = json.loads(done.stdout)
    assert reply["path"] == str(exported["openvino"][0]) and reply["created"] is False
    assert isinstance(reply["seconds"], float) and reply["seconds"] >= 0
    failed = subprocess.run([*command, "--to", "tflite"], capture_output=True, text=True)
    assert failed.returncode == 2 and failed.stdout == ""
    assert failed.stderr.count("\n") == 1 and "BAD_REQUEST" in failed.stderr
