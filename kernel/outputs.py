"""A batch's outputs, split among its jobs by row range, without decoding a tensor.

A driver host answers a ``run`` batch with tensor references (``{"buffer", "dtype",
"shape"}``, docs/protocol.md) to raw frames whose first axis is the batch's inputs, and for
``classify`` the top class of each input (``top``: its index and softmax score, computed
on the host). The kernel hands each job its rows: :func:`split_rows` cuts every frame into
``memoryview`` slices (no copy, no numpy) and adjusts the references' first dimension;
:func:`predictions` cuts the ``top`` lists. Both are pure functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from llmos.contract.protocol import ITEM_BYTES, ProtocolError, checked_ref

TensorRef = dict[str, Any]
Buffer = bytes | memoryview


def split_rows(arrays: Mapping[str, Any], buffers: Sequence[Buffer], counts: Sequence[int],
               ) -> list[tuple[dict[str, TensorRef], list[memoryview]]]:
    """For each job's ``count`` of inputs, in order: its rows of every tensor in ``arrays``
    (name -> tensor reference into ``buffers``), as references into the job's own buffer
    list (one frame per tensor, in ``arrays`` order) and that list of ``memoryview`` slices
    of ``buffers``. The bytes are those numpy gives for ``array[start:start + count]``.

    ProtocolError if a reference is malformed, its buffer's length does not match its shape,
    or its first dimension is not ``sum(counts)``.
    """
    total = sum(counts)
    layout: list[tuple[str, memoryview, int, TensorRef]] = []
    for name, ref in arrays.items():
        view, row_bytes = _rows(ref, buffers, total)
        layout.append((name, view, row_bytes, ref))
    parts: list[tuple[dict[str, TensorRef], list[memoryview]]] = []
    start = 0
    for count in counts:
        refs: dict[str, TensorRef] = {}
        frames: list[memoryview] = []
        for name, view, row_bytes, ref in layout:
            frames.append(view[start * row_bytes:(start + count) * row_bytes])
            refs[name] = {"buffer": len(frames) - 1, "dtype": ref["dtype"],
                          "shape": [count, *ref["shape"][1:]]}
        parts.append((refs, frames))
        start += count
    return parts


def predictions(top: Any, labels: Sequence[str], counts: Sequence[int]) -> list[list[dict[str, Any]]]:
    """For each job's ``count`` of inputs, in order: one ``{"label", "score"}`` per input,
    from the host's ``top`` (``{"index": [int, ...], "score": [float, ...]}``, one entry per
    input of the batch); the label is ``labels[index]``, or the index as a string when the
    model has no label names. ProtocolError if ``top`` is malformed or too short."""
    if not isinstance(top, dict) or not isinstance(top.get("index"), list) \
            or not isinstance(top.get("score"), list):
        raise ProtocolError("top must be a map with the lists index and score")
    indexes, scores = top["index"], top["score"]
    total = sum(counts)
    if len(indexes) != total or len(scores) != total:
        raise ProtocolError(f"top has {len(indexes)} indexes and {len(scores)} scores "
                            f"for {total} inputs")
    names = [labels[i] if labels else str(i) for i in indexes]
    rows = [{"label": name, "score": float(score)} for name, score in zip(names, scores, strict=True)]
    parts, start = [], 0
    for count in counts:
        parts.append(rows[start:start + count])
        start += count
    return parts


def _rows(ref: Any, buffers: Sequence[Buffer], total: int) -> tuple[memoryview, int]:
    """The byte view a valid reference points to and the bytes of one row of it."""
    index, dtype, shape = checked_ref(ref, buffers, rows=total)
    return memoryview(buffers[index]).cast("B"), ITEM_BYTES[dtype] * math.prod(shape[1:])
