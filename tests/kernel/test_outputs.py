"""kernel/outputs.py: a batch's outputs split by row range agree byte for byte with numpy."""

from __future__ import annotations

import numpy as np
import pytest

from llmos.contract.protocol import ProtocolError, tensor_from_ref, tensor_ref
from llmos.kernel.outputs import predictions, split_rows

CASES = [
    ("float32", (7, 384)),
    ("float16", (7, 3, 5)),
    ("int64", (7,)),
    ("int32", (7, 2)),
    ("int8", (7, 0)),
    ("uint8", (7, 4, 1, 3)),
]


@pytest.mark.parametrize(("dtype", "shape"), CASES)
@pytest.mark.parametrize("counts", [[7], [1, 6], [3, 0, 4], [1, 1, 1, 1, 1, 1, 1]])
def test_rows_match_numpy_slicing(dtype: str, shape: tuple[int, ...], counts: list[int]) -> None:
    rng = np.random.default_rng(0)
    arrays = {"a": (rng.standard_normal(shape) * 50).astype(dtype),
              "b": np.arange(7 * 3, dtype=np.float32).reshape(7, 3)}
    buffers: list[bytes] = []
    refs = {name: tensor_ref(array, buffers) for name, array in arrays.items()}
    parts = split_rows(refs, buffers, counts)
    assert len(parts) == len(counts)
    start = 0
    for (job_refs, frames), count in zip(parts, counts, strict=True):
        expected_buffers: list[bytes] = []
        expected = {name: tensor_ref(array[start:start + count], expected_buffers)
                    for name, array in arrays.items()}
        assert job_refs == expected
        assert [bytes(frame) for frame in frames] == expected_buffers
        for name, array in arrays.items():
            got = tensor_from_ref(job_refs[name], [bytes(f) for f in frames])
            np.testing.assert_array_equal(got, array[start:start + count])
        start += count


def test_slices_share_the_hosts_buffer() -> None:
    buffers: list[bytes] = []
    refs = {"x": tensor_ref(np.ones((4, 2), np.float32), buffers)}
    (_, frames), _ = split_rows(refs, buffers, [2, 2])
    assert frames[0].obj is buffers[0]


@pytest.mark.parametrize(("ref", "message"), [
    ({"buffer": 0, "dtype": "float32"}, "must be a map"),
    ({"buffer": 3, "dtype": "float32", "shape": [2, 2]}, "out of range"),
    ({"buffer": 0, "dtype": "float64", "shape": [2, 2]}, "dtype"),
    ({"buffer": 0, "dtype": "float32", "shape": []}, "non-empty list"),
    ({"buffer": 0, "dtype": "float32", "shape": [3, 2]}, "3 rows for 2 inputs"),
    ({"buffer": 0, "dtype": "float32", "shape": [2, 3]}, "needs 24"),
])
def test_malformed_references_are_protocol_errors(ref: dict[str, object], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        split_rows({"x": ref}, [bytes(16)], [1, 1])


def test_predictions_match_the_kernels_numpy_argmax() -> None:
    probs = np.random.default_rng(1).dirichlet(np.ones(3), size=5).astype(np.float32)
    probs[4] = [0.4, 0.2, 0.4]  # a tie: numpy takes the first index on both sides
    top = {"index": probs.argmax(axis=1).tolist(), "score": probs.max(axis=1).tolist()}
    labels = ["neg", "neu", "pos"]
    parts = predictions(top, labels, [2, 3])
    flat = [p for part in parts for p in part]
    assert [len(part) for part in parts] == [2, 3]
    assert flat == [{"label": labels[int(i)], "score": float(row[int(i)])}
                    for row, i in zip(probs, np.argmax(probs, axis=1), strict=True)]
    assert predictions(top, [], [5])[0][0]["label"] == str(int(probs[0].argmax()))


@pytest.mark.parametrize("top", [None, {"index": [0]}, {"index": [0, 1], "score": [0.5]}])
def test_malformed_top_is_a_protocol_error(top: object) -> None:
    with pytest.raises(ProtocolError):
        predictions(top, ["a", "b"], [1, 1])
