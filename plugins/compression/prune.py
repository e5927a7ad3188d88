"""The ``prune`` step: unstructured magnitude pruning, or removing heads / FFN neurons.

``magnitude`` zeroes the ``sparsity`` share of smallest-magnitude weights in every encoder
Linear (``torch.nn.utils.prune``, then made permanent: plain weights with zeros).
``heads`` removes that share of attention heads in every layer and ``neurons`` that share
of feed-forward neurons, ranked by the norms of their weights; the matrices really shrink
(and the version records their shapes, see :mod:`.structure`), so compute shrinks too.
``recover_steps`` of fine-tuning then recover accuracy (for ``magnitude`` with the masks
attached, so pruned weights stay zero).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from .candidate import Candidate, StepContext
from .layers import Block, blocks, linear
from .recover import fine_tune
from .structure import record, set_module


def prune(candidate: Candidate, params: dict[str, Any], context: StepContext) -> Candidate:
    candidate.require_torch("prune")
    method, sparsity = params["method"], params["sparsity"]
    model = candidate.model
    found = blocks(model)
    note: dict[str, Any] = {}
    if method == "magnitude":
        layers = [linear(model, name) for block in found for name in block.linears]
        for layer in layers:
            torch_prune.l1_unstructured(layer, "weight", amount=sparsity)
        if params["recover_steps"]:  # the masks stay attached: pruned weights stay zero
            note["recovery_loss"] = fine_tune(candidate, context, params["recover_steps"],
                                              params["learning_rate"])
        for layer in layers:
            torch_prune.remove(layer, "weight")  # permanent: plain weights with zeros
        zeros = sum(int((layer.weight == 0).sum()) for layer in layers)
        note["sparsity"] = round(zeros / sum(layer.weight.numel() for layer in layers), 4)
        candidate.notes.append(note)
        return candidate
    shapes: dict[str, list[int]] = {}
    kept = []
    for block in found:
        if method == "heads":
            kept.append(_prune_heads(model, block, sparsity, shapes))
        else:
            kept.append(_prune_neurons(model, block, sparsity, shapes))
    record(model, shapes=shapes)
    note[f"kept_{method}"] = kept
    if params["recover_steps"]:
        note["recovery_loss"] = fine_tune(candidate, context, params["recover_steps"],
                                          params["learning_rate"])
    candidate.notes.append(note)
    return candidate


def _keep(scores: torch.Tensor, share_removed: float) -> torch.Tensor:
    """Sorted indices of the units to keep (at least one)."""
    count = max(1, round(len(scores) * (1 - share_removed)))
    return torch.sort(torch.topk(scores, count).indices).values


def _shrink(model: nn.Module, name: str, rows: torch.Tensor | None, columns: torch.Tensor | None,
            shapes: dict[str, list[int]]) -> None:
    """Replace Linear ``name`` by one keeping only ``rows`` (outputs) / ``columns`` (inputs)."""
    old = linear(model, name)
    weight, bias = old.weight.data, old.bias.data if old.bias is not None else None
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if columns is not None:
        weight = weight[:, columns]
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    set_module(model, name, new)
    shapes[name] = [new.in_features, new.out_features]


def _prune_heads(model: nn.Module, block: Block, share: float, shapes: dict[str, list[int]]) -> int:
    size = block.head_size
    value = linear(model, block.value).weight.data
    out = linear(model, block.attention_out).weight.data
    heads = value.shape[0] // size
    scores = torch.stack([value[h * size:(h + 1) * size].norm() * out[:, h * size:(h + 1) * size].norm()
                          for h in range(heads)])
    keep = _keep(scores, share)
    rows = torch.cat([torch.arange(h * size, (h + 1) * size) for h in keep.tolist()])
    for name in (block.query, block.key, block.value):
        _shrink(model, name, rows, None, shapes)
    _shrink(model, block.attention_out, None, rows, shapes)
    return len(keep)


def _prune_neurons(model: nn.Module, block: Block, share: float,
                   shapes: dict[str, list[int]]) -> int:
    up = linear(model, block.intermediate).weight.data
    down = linear(model, block.output).weight.data
    keep = _keep(up.norm(dim=1) * down.norm(dim=0), share)
    _shrink(model, block.intermediate, keep, None, shapes)
    _shrink(model, block.output, None, keep, shapes)
    return len(keep)
