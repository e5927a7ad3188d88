"""The ``lowrank`` step: every encoder Linear becomes two factors of its truncated SVD.

``W (out x in) ~ U_r S_r V_r^T`` is stored as ``down = sqrt(S_r) V_r^T`` (r x in) and
``up = U_r sqrt(S_r)`` (out x r). The rank is chosen per layer: the smallest that keeps
``energy`` of the squared singular values, or the largest whose factors hold ``budget``
of the layer's parameters (default 0.5), or a fixed ``rank``; a layer whose factors would
not be smaller stays as it is. ``recover_steps`` optimizer steps on the training split
then recover accuracy. The report lists every layer's rank.
"""

from __future__ import annotations

from typing import Any

import torch

from .candidate import Candidate, StepContext
from .layers import blocks, linear
from .recover import fine_tune
from .structure import LowRankLinear, record, set_module


def lowrank(candidate: Candidate, params: dict[str, Any], context: StepContext) -> Candidate:
    candidate.require_torch("lowrank")
    model = candidate.model
    ranks: dict[str, int] = {}
    before = after = 0
    for block in blocks(model):
        for name in block.linears:
            layer = linear(model, name)
            weight = layer.weight.data.float()
            u, s, vt = torch.linalg.svd(weight, full_matrices=False)
            rank = _rank(s, layer.in_features, layer.out_features, params)
            size = layer.in_features * layer.out_features
            before += size
            if rank * (layer.in_features + layer.out_features) >= size:
                after += size
                continue
            root = s[:rank].sqrt()
            factors = LowRankLinear(layer.in_features, layer.out_features, rank,
                                    layer.bias is not None)
            factors.down.weight.data.copy_(root[:, None] * vt[:rank])
            factors.up.weight.data.copy_(u[:, :rank] * root[None, :])
            if layer.bias is not None:
                factors.up.bias.data.copy_(layer.bias.data)
            set_module(model, name, factors)
            ranks[name] = rank
            after += rank * (layer.in_features + layer.out_features)
    record(model, lowrank=ranks)
    note: dict[str, Any] = {"ranks": ranks, "linear_parameters": {"before": before, "after": after,
                                                                  "kept": round(after / before, 4)}}
    if params["recover_steps"]:
        note["recovery_loss"] = fine_tune(candidate, context, params["recover_steps"],
                                          params["learning_rate"])
    candidate.notes.append(note)
    return candidate


def _rank(s: torch.Tensor, in_features: int, out_features: int, params: dict[str, Any]) -> int:
    limit = len(s)
    if params["rank"] is not None:
        return min(limit, params["rank"])
    if params["energy"] is not None:
        share = (s ** 2).cumsum(0) / (s ** 2).sum()
        return min(limit, int((share < params["energy"]).sum()) + 1)
    budget = params["budget"] if params["budget"] is not None else 0.5
    return max(1, min(limit, int(budget * in_features * out_features / (in_features + out_features))))
