"""The built-in update methods: what an update trains, and how the result is saved.

An update method is ``function(model, params) -> Trainable``: it receives the serving
version's torch sequence classifier (a fresh copy the method may change) and the checked
parameters, and returns the module to train, the parameters the optimizer moves, the
learning rate and epochs, and how to save the trained result as a Hugging Face folder that
every driver can serve (safetensors). The session does the rest the same way for every
method: batches of new examples mixed with replayed old ones, the distillation term, the
measurements and the gate (see :mod:`llmos.plugins.learning.session`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from llmos.kernel.registry import ADAPTER_DIR


@dataclass(slots=True)
class Trainable:
    """What an update method hands the session."""

    #: Called like the classifier (``module(**batch).logits``).
    module: torch.nn.Module
    #: The parameters the optimizer updates (the rest stay frozen).
    parameters: list[torch.nn.Parameter]
    learning_rate: float
    epochs: float
    #: Writes the trained classifier into an empty folder (config.json, safetensors).
    save: Callable[[Path], None]


def _save_whole(model: PreTrainedModel) -> Callable[[Path], None]:
    def save(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
    return save


def _freeze_all_but(model: PreTrainedModel, keep: Callable[[str], bool]) -> list[torch.nn.Parameter]:
    trained = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad = keep(name)
        if parameter.requires_grad:
            trained.append(parameter)
    return trained


def online(model: PreTrainedModel, params: dict[str, Any]) -> Trainable:
    """Online SGD on the classification head and the top ``layers`` transformer layers
    (AdamW); everything below stays as it is."""
    base = f"{model.base_model_prefix}."
    depth = int(model.config.num_hidden_layers)
    top = set(range(max(0, depth - params["layers"]), depth))

    def keep(name: str) -> bool:
        if not name.startswith(base) or ".pooler." in name:
            return True  # the head (and BERT's pooler, which only the head reads)
        match = re.search(r"\.layers?\.(\d+)\.", name)
        return match is not None and int(match.group(1)) in top

    return Trainable(model, _freeze_all_but(model, keep), params["learning_rate"],
                     params["epochs"], _save_whole(model))


def finetune(model: PreTrainedModel, params: dict[str, Any]) -> Trainable:
    """Every parameter trains: with ``replay 0 distill 0`` this is the naive fine-tune
    that forgets (the baseline the learning benchmark compares against)."""
    return Trainable(model, _freeze_all_but(model, lambda name: True), params["learning_rate"],
                     params["epochs"], _save_whole(model))


def lora(model: PreTrainedModel, params: dict[str, Any]) -> Trainable:
    """LoRA adapters (``peft``) of rank ``rank`` on the layers named in ``targets`` (Linear
    or Embedding), and a trainable copy of the classification head. Saved twice: the adapter in PEFT's own
    format under ``adapter/`` (its base is the parent version's folder), and the adapter
    merged into the weights, so that every driver serves the version as a plain model."""
    from peft import LoraConfig, get_peft_model

    head = [name for name, child in model.named_children()  # with weights (not dropout)
            if name != model.base_model_prefix and any(True for _ in child.parameters())]
    config = LoraConfig(r=params["rank"], lora_alpha=params["alpha"], lora_dropout=0.0,
                        target_modules=list(params["targets"]), modules_to_save=head)
    wrapped = get_peft_model(model, config)

    def save(folder: Path) -> None:
        wrapped.save_pretrained(folder / ADAPTER_DIR, safe_serialization=True)
        wrapped.merge_and_unload().save_pretrained(folder, safe_serialization=True)

    return Trainable(wrapped, [p for p in wrapped.parameters() if p.requires_grad],
                     params["learning_rate"], params["epochs"], save)
