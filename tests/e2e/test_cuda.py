"""CUDA devices: run on a GPU machine (`pytest -m cuda`); skipped where this torch has no
usable CUDA device (no GPU, or the CPU wheel on a GPU machine)."""

import numpy as np
import pytest
import torch

from llmos.kernel.testing import running_kernel

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="no CUDA device this torch can use")]


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
