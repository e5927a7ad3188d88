"""load --precision int8: OpenVINO serves MiniLM quantized by nncf, calibrated on a dataset,
close to the exact fp32 embeddings; bad calibration requests are refused."""

from __future__ import annotations

import numpy as np
import pytest

from llmos import ErrorCode, KernelError
from llmos.kernel import datasets
from llmos.kernel.testing import running_kernel


def test_int8_openvino_embeddings_stay_close_to_fp32(home):
    texts = [t[:300] for t in datasets.load("drugs").split("test")[0][:24]]
    with running_kernel(home, "--devices", "torch:cpu,openvino:cpu") as kernel, \
            kernel.client() as client:
        client.import_model("minilm")
        with pytest.raises(KernelError) as info:
            client.load("minilm", driver="openvino", precision="int8")
        assert info.value.code is ErrorCode.BAD_REQUEST
        assert "records no training data: pass calibrate" in info.value.message
        with pytest.raises(KernelError) as info:
            client.load("minilm", driver="openvino", precision="int8", calibrate="/no/such.csv")
        assert info.value.code is ErrorCode.NOT_FOUND
        client.load("minilm", driver="torch")
        exact = client.embed("minilm", texts)
        client.unload("minilm")
        loaded = client.load("minilm", driver="openvino", precision="int8", calibrate="reviews")
        assert loaded["precision"] == {"openvino:cpu": "int8"}
        int8 = client.embed("minilm", texts)
        artifacts = sorted(p.name for p in (kernel.home / "models" / "minilm" / "v1").rglob("int8-*"))
    cosine = np.sum(exact * int8, axis=1)  # both are L2-normalised
    assert cosine.min() > 0.98 and cosine.mean() > 0.99, cosine
    assert not np.allclose(exact, int8, atol=1e-4)  # it really is another computation
    assert len(artifacts) == 2  # int8-<key>.xml and .bin, cached for the next load
