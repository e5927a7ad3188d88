"""CUDA devices: run on a GPU machine (`pytest -m cuda`); skipped where there is none."""

import glob

import numpy as np
import pytest

from llmos.kernel.testing import running_kernel

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not glob.glob("/dev/nvidia[0-9]*"), reason="no NVIDIA GPU here")]


def test_torch_cuda_matches_cpu(home):
    texts = ["A man is playing a guitar.", "The central bank raised interest rates."]
    with running_kernel(home, "--devices", "torch:cpu,torch:cuda:0") as kernel, \
            kernel.client() as client:
        client.import_model("minilm")
        client.load("minilm", device="torch:cpu")
        cpu = client.embed("minilm", texts)
        client.unload("minilm", device="torch:cpu")
        client.load("minilm", device="torch:cuda:0")
        result = client.infer("minilm", "embed", texts)
        assert client.job(result["job"])["device"] == "torch:cuda:0"
    assert np.abs(result["embeddings"] - cpu).max() < 1e-4
