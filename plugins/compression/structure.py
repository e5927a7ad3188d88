"""Saving and loading torch models whose structure compression changed.

Structured pruning shrinks Linear layers, low-rank factorization replaces them by two
factors, and ``torch-int8`` quantizes them at load. Transformers cannot rebuild such a
model from its config alone, so a compressed version's ``config.json`` carries a
``llmos_compression`` section::

    {"shapes": {"bert.encoder.layer.0.intermediate.dense": [384, 768], ...},
     "lowrank": {"bert.encoder.layer.0.attention.self.query": 96, ...},
     "torch_int8": false}

and names its loader, :func:`load_compressed`, under ``llmos_loader``
(:data:`llmos.drivers.pytorch.LOADER_KEY`): the torch driver imports it by that name. It
builds the model from its config, reshapes those layers, then loads the safetensors weights
strictly (every tensor must fit), so a version loads exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel

from llmos.drivers.pytorch import LOADER_KEY

#: The config.json key of the structure record.
KEY = "llmos_compression"
#: How the torch driver finds :func:`load_compressed` (the config's ``LOADER_KEY``).
LOADER = "llmos.plugins.compression.structure:load_compressed"


class LowRankLinear(nn.Module):
    """``up(down(x))``: a Linear(in, out) replaced by Linear(in, rank) then Linear(rank, out)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``module``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def structure_of(model: nn.Module) -> dict[str, Any]:
    """The record that rebuilds ``model``'s changed layers (empty when nothing changed)."""
    return dict(getattr(model.config, KEY, None) or {})


def record(model: PreTrainedModel, **changes: Any) -> None:
    """Merge ``changes`` into the model's structure record (kept in its config, with the
    name of the loader that rebuilds it)."""
    current = structure_of(model)
    for key, value in changes.items():
        current[key] = {**current.get(key, {}), **value} if isinstance(value, dict) else value
    setattr(model.config, KEY, current)
    setattr(model.config, LOADER_KEY, LOADER)


def load_compressed(path: str | Path) -> PreTrainedModel:
    """The classifier saved in ``path`` with its recorded structure; safetensors only."""
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    structure = getattr(config, KEY, None) or {}
    model = AutoModelForSequenceClassification.from_config(config)
    for name, (in_features, out_features) in structure.get("shapes", {}).items():
        set_module(model, name, nn.Linear(in_features, out_features))
    for name, rank in structure.get("lowrank", {}).items():
        old = model.get_submodule(name)
        set_module(model, name, LowRankLinear(old.in_features, old.out_features, rank,
                                              old.bias is not None))
    state = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(file)))
    model.load_state_dict(state, strict=False)
    missing = set(model.state_dict()) - set(state)
    missing -= {k for k in missing if k.endswith("position_ids")}
    if missing:
        raise ValueError(f"{path}: weights missing for {sorted(missing)[:5]}")
    dtype = getattr(config, "dtype", None)
    if dtype is not None:
        model = model.to(getattr(torch, str(dtype).removeprefix("torch.")))
    if structure.get("torch_int8"):
        model = quantize_dynamic(model)
    return model.eval()


def quantize_dynamic(model: PreTrainedModel) -> PreTrainedModel:
    """Linear layers in dynamic int8 (weights int8, activations quantized per batch)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice (works in 2.13)
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def needs_rebuild(config: Any) -> bool:
    """True when a config records changed layers that from_pretrained cannot rebuild."""
    return bool(getattr(config, KEY, None))
