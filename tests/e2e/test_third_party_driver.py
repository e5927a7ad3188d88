"""A third-party driver package (examples/llmos-numpy-driver), installed with pip, registers
through the ``llmos`` entry-point group and is scheduled exactly like the built-ins."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmos.kernel.testing import running_kernel

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "llmos-numpy-driver"
SENTENCES = ["A man is playing a guitar.", "short",
             "The committee discussed the quarterly budget and the new hiring plan at length."]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(EXAMPLE)],
                   check=True, capture_output=True)
    return target


def test_the_example_driver_serves_like_a_builtin(installed, home, monkeypatch, minilm_kernel):
    monkeypatch.setenv("PYTHONPATH", str(installed))
    with running_kernel(home, "--devices", "torch:cpu,numpy:cpu") as kernel, \
            kernel.client() as client:
        assert "numpy" in client.info()["plugins"]
        (numpy,) = [d for d in client.drivers() if d["name"] == "numpy"]
        assert numpy["available"] and numpy["batching"]["max_batch_size"] == 8
        client.import_model("minilm")
        loaded = client.load("minilm", driver="numpy")
        assert loaded["devices"] == ["numpy:cpu"]
        result = client.infer("minilm", "embed", SENTENCES)
        assert client.job(result["job"])["device"] == "numpy:cpu"
        everywhere = client.load("minilm")  # automatic placement now times both drivers
        assert sorted(everywhere["devices"]) == ["numpy:cpu", "torch:cpu"]
        assert sorted(client.models()[0]["timings_ms"]) == ["numpy:cpu", "torch:cpu"]
    with minilm_kernel.client() as torch_only:
        reference = torch_only.embed("minilm", SENTENCES)
    assert np.abs(result["embeddings"] - reference).max() < 1e-4
