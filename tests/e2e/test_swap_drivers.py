"""A swap back restores a version everywhere it served: after ``promote`` of a version that
runs on one runtime only (an OpenVINO int8 graph), ``rollback`` loads the old version again
on every driver it was on, not only where its replacement ran."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from llmos.kernel.sources import _minilm_path
from llmos.kernel.testing import KernelProcess, build_tiny_classifier, running_kernel, wait_for
from tests.conftest import short_home
from tests.e2e.test_compress import write_reviews


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KernelProcess]:
    folder = tmp_path_factory.mktemp("swap")
    home = short_home()
    with running_kernel(home, "--devices", "torch:cpu,openvino:cpu") as kernel:
        with kernel.client() as client:
            model = build_tiny_classifier(folder / "tiny", _minilm_path())
            client.import_model(path=str(model), name="tiny")
            client.compress("tiny", [{"step": "quantize", "method": "openvino-int8"}],
                            path=str(write_reviews(folder / "reviews.jsonl")), quantum=0.05,
                            timeout=600)
        yield kernel
    shutil.rmtree(home, ignore_errors=True)


def placed(client, handle: str) -> list[str]:
    return sorted(next(m["loaded_on"] for m in client.models()
                       if f"{m['model']}:{m['version']}" == handle))


@pytest.mark.timeout(900)
def test_rollback_loads_the_old_version_on_every_driver_it_served_on(kernel):
    with kernel.client(timeout=600) as client:
        client.load("tiny", version=1, driver="torch")
        client.load("tiny", version=1, driver="openvino")
        assert placed(client, "tiny:1") == ["openvino:cpu", "torch:cpu"]
        (int8,) = [m for m in client.models() if m["model"] == "tiny" and m["version"] == 2]
        assert int8["recipe"]["drivers"] == ["openvino"]
        promoted = client.promote("tiny", 2)
        assert promoted["model"] == "tiny:2" and promoted["devices"] == ["openvino:cpu"]
        wait_for(lambda: placed(client, "tiny:1") == [], "tiny:1 unloaded after the promote",
                 timeout=60)
        back = client.rollback("tiny")
        assert back["model"] == "tiny:1" and sorted(back["devices"]) == ["openvino:cpu", "torch:cpu"]
        assert placed(client, "tiny:1") == ["openvino:cpu", "torch:cpu"]
        wait_for(lambda: placed(client, "tiny:2") == [], "tiny:2 unloaded after the rollback",
                 timeout=60)
