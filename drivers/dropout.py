"""Keyed dropout: a training step's dropout masks as a function of the example, not the process.

Contract: inside ``with keyed_dropout(model, DropoutKey(seed, step, rows)):`` a training
forward of ``model`` draws every dropout mask, for its ``nn.Dropout`` modules and for the
dropout on attention probabilities, row by row: row ``b`` of the tensor (the first dimension
is the batch) is masked from a generator seeded with a hash of ``(seed, step, rows[b],
call)``, where ``rows[b]`` is the example's index in the step's **global** batch and ``call``
counts the forward's dropout calls in order. Nothing draws from torch's global generator.

So the masks of an example depend only on the job's seed, the step, the example's place in
the global batch and the layer: one process with the whole batch and N data-parallel ranks
with strided rows of it draw the same masks, provided each row has the same shape in both
(pad every shard to the global batch's longest row). The ranks' averaged gradient then
equals the single process's up to float summation order, and a job resumed from a
checkpoint, with any world size, follows the uninterrupted job's trajectory.

While keyed, the model's attention runs as eager attention (scores, additive mask, softmax,
keyed dropout, weighted values) under the registered implementation :data:`ATTENTION`;
attention without dropout (probability 0) runs torch's fused SDPA. Dropout called
functionally elsewhere in a model (``F.dropout`` outside the attention function, as BART
does) is not keyed. On exit the model is as before: its dropout modules' ``forward`` and its
attention implementation are restored. A block keys the forwards of its own thread and does
not nest. Masks are drawn on a CPU generator (mt19937, which keeps the low 32 bits of a
seed: rows of different keys share a mask about once in 2**32 pairs, harmlessly).
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

#: The attention implementation a keyed forward runs under (registered with transformers).
ATTENTION = "llmos_keyed_dropout"


@dataclass(slots=True)
class DropoutKey:
    """What one forward's masks are drawn from; ``calls`` counts its dropout calls so far."""

    seed: int  # the job's seed
    step: int  # the optimizer step
    rows: Sequence[int]  # each batch row's index in the step's global batch
    calls: int = 0
    generator: torch.Generator = field(default_factory=torch.Generator)

    def row_seed(self, row: int, call: int) -> int:
        """A 64-bit hash of (seed, step, row, call)."""
        packed = struct.pack("<4q", self.seed, self.step, row, call)
        return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little")

    def drop(self, x: torch.Tensor, p: float) -> torch.Tensor:
        """``x`` with dropout ``p`` applied, row ``b``'s mask keyed by ``rows[b]``."""
        call, self.calls = self.calls, self.calls + 1
        if p == 0.0:
            return x
        if x.shape[0] != len(self.rows):
            raise RuntimeError(f"keyed dropout: a tensor of {x.shape[0]} rows in a batch of "
                               f"{len(self.rows)}: the batch must be the first dimension")
        uniform = torch.empty(x.shape, dtype=torch.float32)
        for b, row in enumerate(self.rows):
            self.generator.manual_seed(self.row_seed(row, call))
            torch.rand(x.shape[1:], generator=self.generator, out=uniform[b])
        return x * (uniform >= p).to(device=x.device, dtype=x.dtype) / (1.0 - p)


def _keyed_module_forward(module: nn.Dropout, key: DropoutKey, x: torch.Tensor) -> torch.Tensor:
    return key.drop(x, module.p) if module.training else x


class _Active(threading.local):
    """The key of the keyed forward in progress on this thread (None outside one)."""

    key: DropoutKey | None = None


_ACTIVE = _Active()


def _keyed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None,
                     scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention-function contract ([batch, heads, seq, dim] in, [batch, seq,
    heads, dim] out); the probabilities' dropout is keyed."""
    active = _ACTIVE.key
    if dropout == 0.0 or active is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=0.0, **kwargs)
    groups = query.shape[1] // key.shape[1]  # grouped-query attention shares key/value heads
    if groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, :key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = active.drop(probs, dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


AttentionInterface.register(ATTENTION, _keyed_attention)
AttentionMaskInterface.register(ATTENTION, eager_mask)


@contextmanager
def keyed_dropout(model: PreTrainedModel, key: DropoutKey) -> Iterator[DropoutKey]:
    """Key every dropout of ``model``'s forwards inside the block (see the module's contract).
    Backward may run outside: the masks are saved in the autograd graph."""
    if _ACTIVE.key is not None:
        raise RuntimeError("keyed dropout does not nest")
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    attention = model.config._attn_implementation
    for module in dropouts:
        module.forward = partial(_keyed_module_forward, module, key)  # type: ignore[method-assign]
    model.config._attn_implementation = ATTENTION
    _ACTIVE.key = key
    try:
        yield key
    finally:
        _ACTIVE.key = None
        model.config._attn_implementation = attention
        for module in dropouts:
            del module.forward
