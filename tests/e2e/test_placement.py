"""Automatic placement across the PyTorch, ONNX Runtime and OpenVINO driver hosts."""

import numpy as np
import pytest

from llmos import ErrorCode, KernelError
from llmos.kernel.jobs import Job
from llmos.kernel.placement import batch_shape
from llmos.kernel.testing import running_kernel

SENTENCES = ["A man is playing a guitar.", "The weather is lovely today, warm and sunny.",
             "Stocks fell sharply after the central bank raised rates by half a point."]


@pytest.fixture(scope="module")
def placed():
    from tests.conftest import short_home

    with running_kernel(short_home()) as kernel, kernel.client() as client:
        client.import_model("minilm")
        loaded = client.load("minilm")
        yield kernel, client, loaded


def test_default_load_places_the_model_on_every_driver_and_times_it(placed):
    _, client, loaded = placed
    assert sorted(loaded["devices"]) == ["onnxruntime:cpu", "openvino:cpu", "torch:cpu"]
    assert set(loaded["precision"].values()) == {"f32"}
    (row,) = client.models()
    assert sorted(row["timings_ms"]) == sorted(loaded["devices"])
    assert all(len(table) == 9 and min(table.values()) > 0 for table in row["timings_ms"].values())


def test_batches_go_to_the_fastest_driver_for_their_shape(placed):
    _, client, _ = placed
    timings = client.models()[0]["timings_ms"]
    for texts in (SENTENCES[:1], SENTENCES * 10):
        result = client.infer("minilm", "embed", texts)
        job = Job("infer", "x", {"inputs": texts})
        n, tokens = batch_shape([job])
        bucket_n = next(b for b in (1, 8, 32) if b >= n)
        bucket_t = next(t for t in (16, 64, 128) if t >= tokens)
        fastest = min(timings, key=lambda host: timings[host][f"{bucket_n}x{bucket_t}"])
        assert client.job(result["job"])["device"] == fastest


def test_results_agree_with_the_pytorch_driver_whatever_the_route(placed, minilm_kernel):
    _, client, _ = placed
    routed = client.embed("minilm", SENTENCES)
    with minilm_kernel.client() as torch_only:
        reference = torch_only.embed("minilm", SENTENCES)
    assert np.abs(routed - reference).max() < 1e-4


def test_export_is_cached_per_version(placed):
    _, client, _ = placed
    result = client.export("minilm", "onnx")
    assert result["created"] is False and result["path"].endswith("model.onnx")


def test_bad_placement_requests_get_clear_errors(placed):
    _, client, _ = placed
    cases = [
        (lambda: client.load("minilm", device="tpu:0"), ErrorCode.NOT_FOUND, "unknown device"),
        (lambda: client.load("minilm", driver="tensorrt"),
         ErrorCode.NOT_FOUND, "unknown driver"),
        (lambda: client.export("minilm", "tflite"),
         ErrorCode.BAD_REQUEST, "onnx, openvino"),
        (lambda: client.export("ghost", "onnx"),
         ErrorCode.NOT_FOUND, "ghost"),
    ]
    for call, code, fragment in cases:
        with pytest.raises(KernelError) as info:
            call()
        assert info.value.code is code and fragment in info.value.message
    assert client.embed("minilm", ["still serving"]).shape == (1, 384)


def test_a_driver_that_is_not_started_and_a_memory_budget_overflow(home):
    with running_kernel(home, "--devices", "torch:cpu", "--memory-budget-mb", "100") as kernel, \
            kernel.client() as client:
        client.import_model("minilm")
        with pytest.raises(KernelError) as not_started:
            client.load("minilm", driver="openvino")
        with pytest.raises(KernelError) as too_big:
            client.load("minilm")
        assert client.ping() == {"pong": True}
        assert client.devices()[0]["loaded"] == []
    assert not_started.value.code is ErrorCode.DEVICE_FAILED
    assert too_big.value.code is ErrorCode.BUSY and "budget" in too_big.value.message
