"""The ``lowrank`` step: every encoder Linear becomes two factors of its truncated SVD.

``W (out x in) ~ U_r S_r V_r^T`` is stored as ``down = sqrt(S_r) V_r^T`` (r x in) and
``up = U_r sqrt(S_r)`` (out x r). The rank is chosen per layer: the smallest that keeps
``energy`` of the squared singular values; or from a parameter ``budget`` (default 0.5 of
the Linear parameters), ``uniform``-ly (each layer keeps that share; the default) or
spent ``global``-ly on the singular directions that keep the most of their layer's energy
per parameter (on MiniLM this starves the FFN layers and loses more accuracy); or
a fixed ``rank``. A layer whose factors would not be smaller stays as it is.
``recover_steps`` optimizer steps on the training split then recover accuracy. The report
lists every layer's rank.
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
    names = [name for block in blocks(model) for name in block.linears]
    layers = {name: linear(model, name) for name in names}
    svds = {name: torch.linalg.svd(layer.weight.data.float(), full_matrices=False)
            for name, layer in layers.items()}
    chosen = _ranks({name: (svds[name][1], layers[name].in_features, layers[name].out_features)
                     for name in names}, params)
    ranks: dict[str, int] = {}
    before = after = 0
    for name in names:
        layer, (u, s, vt), rank = layers[name], svds[name], chosen[name]
        size = layer.in_features * layer.out_features
        before += size
        if rank * (layer.in_features + layer.out_features) >= size:
            after += size
            continue
        root = s[:rank].sqrt()
        factors = LowRankLinear(layer.in_features, layer.out_features, rank, layer.bias is not None)
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


def _ranks(spectra: dict[str, tuple[torch.Tensor, int, int]],
           params: dict[str, Any]) -> dict[str, int]:
    """Layer name -> rank, from ``(singular values, in, out)`` per layer."""
    if params["rank"] is not None:
        return {name: min(len(s), params["rank"]) for name, (s, _, _) in spectra.items()}
    if params["energy"] is not None:
        ranks = {}
        for name, (s, _, _) in spectra.items():
            share = (s ** 2).cumsum(0) / (s ** 2).sum()
            ranks[name] = min(len(s), int((share < params["energy"]).sum()) + 1)
        return ranks
    budget = params["budget"] if params["budget"] is not None else 0.5
    if params["allocation"] == "uniform":  # measured better than global on MiniLM
        return {name: max(1, min(len(s), int(budget * i * o / (i + o))))
                for name, (s, i, o) in spectra.items()}
    return _allocate(spectra, budget)


def _allocate(spectra: dict[str, tuple[torch.Tensor, int, int]], budget: float) -> dict[str, int]:
    """Spend ``budget`` of all the layers' parameters on the singular directions that keep
    the most of their layer's energy per parameter (greedy; each layer keeps rank >= 1)."""
    ranks = {name: 1 for name in spectra}
    spent = sum(i + o for _, i, o in spectra.values())
    allowed = budget * sum(i * o for _, i, o in spectra.values())
    offers = []  # (energy share per parameter, name, rank it brings the layer to)
    for name, (s, i, o) in spectra.items():
        share = (s ** 2) / (s ** 2).sum()
        offers += [(float(share[k]) / (i + o), name, k + 1) for k in range(1, len(s))]
    for _, name, rank in sorted(offers, reverse=True):
        _, i, o = spectra[name]
        if rank == ranks[name] + 1 and spent + i + o <= allowed:
            ranks[name] = rank
            spent += i + o
    return ranks
