"""The torch, ONNX Runtime and OpenVINO drivers give the same answers for the same model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import openvino
import psutil
import pytest

from llmos import ErrorCode, KernelError
from llmos.contract.hostwire import HostMessage, unpack
from llmos.drivers.base import Driver, LoadedModel
from llmos.drivers.host import run_task
from llmos.drivers.onnxruntime import OnnxRuntimeDriver
from llmos.drivers.openvino import OpenVinoDriver
from llmos.drivers.pytorch import TorchDriver

SENTENCES = [
    "Hi.",
    "A man is playing a guitar.",
    "The central bank raised interest rates again this quarter, surprising most analysts.",
    "Short one",
    "Tokenizers split unfamiliar words like antidisestablishmentarianism into several pieces, "
    "so this sentence is by far the longest of the batch and pads all the others.",
]
TOLERANCE = 1e-4
HANDLE = "model:1"

Loaded = tuple[dict[str, Driver], dict[str, LoadedModel]]


def _load_all(path: Path) -> Loaded:
    drivers: dict[str, Driver] = {}
    infos: dict[str, LoadedModel] = {}
    for cls in (TorchDriver, OnnxRuntimeDriver, OpenVinoDriver):
        drivers[cls.name] = cls("cpu", 2)
        infos[cls.name] = drivers[cls.name].load(HANDLE, str(path), {})
    return drivers, infos


@pytest.fixture(scope="module")
def embedders(minilm_dir: Path) -> Loaded:
    """MiniLM loaded by each driver (the ONNX Runtime load exports it, OpenVINO converts it)."""
    return _load_all(minilm_dir)


@pytest.fixture(scope="module")
def classifiers(classifier_dir: Path) -> Loaded:
    """The tiny classifier loaded by each driver."""
    return _load_all(classifier_dir)


def _run_all(drivers: dict[str, Driver], task: str, key: str) -> tuple[dict[str, np.ndarray], set[int]]:
    outputs, tokens = {}, set()
    for name, driver in drivers.items():
        result = driver.run(HANDLE, task, SENTENCES, {})
        outputs[name] = result.arrays[key]
        tokens.add(result.tokens)
    return outputs, tokens


def _assert_agree(outputs: dict[str, np.ndarray]) -> None:
    differences = {name: float(np.abs(out - outputs["torch"]).max()) for name, out in outputs.items()}
    assert max(differences.values()) < TOLERANCE, differences


def test_embeddings_agree_within_1e_4(embedders):
    outputs, tokens = _run_all(embedders[0], "embed", "embeddings")
    for name, vectors in outputs.items():
        assert vectors.shape == (len(SENTENCES), 384) and vectors.dtype == np.float32, name
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5, err_msg=name)
    _assert_agree(outputs)
    assert len(tokens) == 1  # tokens are counted the same way everywhere


def test_a_padded_input_embeds_as_it_does_alone(embedders):
    for name, driver in embedders[0].items():
        batched = driver.run(HANDLE, "embed", SENTENCES, {}).arrays["embeddings"][0]
        alone = driver.run(HANDLE, "embed", SENTENCES[:1], {}).arrays["embeddings"][0]
        np.testing.assert_allclose(batched, alone, atol=TOLERANCE, err_msg=name)


def test_classify_probabilities_agree_within_1e_4(classifiers):
    probs, tokens = _run_all(classifiers[0], "classify", "probs")
    for name, p in probs.items():
        assert p.shape == (len(SENTENCES), 2) and p.dtype == np.float32, name
        np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5, err_msg=name)
    _assert_agree(probs)
    assert len(tokens) == 1
    embeddings, _ = _run_all(classifiers[0], "embed", "embeddings")
    _assert_agree(embeddings)


def test_every_driver_reports_the_same_model(embedders, classifiers):
    for (_, infos), tasks, labels in ((embedders, ["embed"], []),
                                      (classifiers, ["embed", "classify"], ["negative", "positive"])):
        assert all(info == infos["torch"] for info in infos.values()), infos
        assert infos["torch"].tasks == tasks and infos["torch"].labels == labels
        assert infos["torch"].precision == "f32"
    assert embedders[1]["torch"].parameters == 22_713_216


def test_openvino_bf16_is_close_to_f32(minilm_dir, embedders):
    core = openvino.Core()
    if "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16: OpenVINO would fall back to f32")
    driver = OpenVinoDriver("cpu", 2)
    load = {"task": 1, "op": "load", "handle": "bf16:1", "path": str(minilm_dir),
            "options": {"precision": "bf16"}}
    kind, body = run_task(driver, load, psutil.Process())  # as the driver host loads it
    assert kind == HostMessage.DONE and unpack(body)["info"]["precision"] == "bf16"
    fast = driver.run("bf16:1", "embed", SENTENCES, {}).arrays["embeddings"]
    exact = embedders[0]["openvino"].run(HANDLE, "embed", SENTENCES, {}).arrays["embeddings"]
    assert fast.dtype == np.float32
    assert 0 < np.abs(fast - exact).max() < 0.05


def test_openvino_refuses_an_unknown_precision(minilm_dir):
    with pytest.raises(KernelError) as info:
        OpenVinoDriver("cpu", 1).load("x:1", str(minilm_dir), {"precision": "int3"})
    assert info.value.code is ErrorCode.BAD_REQUEST and "f32, bf16" in info.value.message


def test_errors_are_those_of_the_torch_driver(embedders):
    for name, driver in embedders[0].items():
        with pytest.raises(KernelError) as missing:
            driver.run("nope:1", "embed", ["x"], {})
        with pytest.raises(KernelError) as headless:
            driver.run(HANDLE, "classify", ["x"], {})
        assert missing.value.code is ErrorCode.NOT_FOUND, name
        assert headless.value.code is ErrorCode.BAD_REQUEST, name
        assert "classification head" in headless.value.message, name
        driver.unload("nope:1")  # unknown handles are ignored


def test_describe_names_framework_and_threads(embedders):
    for name, driver in embedders[0].items():
        described = driver.describe()
        assert described["framework"].startswith(f"{name} "), described
        assert described["device"] == "cpu" and described["threads"] == 2
        assert described["memory_bytes"] > 0


def test_missing_accelerators_fail_at_start():
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(KernelError) as cuda:
            OnnxRuntimeDriver("cuda:0", 1)
        assert cuda.value.code is ErrorCode.DEVICE_FAILED
    if not any(d.startswith("GPU") for d in openvino.Core().available_devices):
        with pytest.raises(KernelError) as gpu:
            OpenVinoDriver("gpu", 1)
        assert gpu.value.code is ErrorCode.DEVICE_FAILED
