"""Finding the encoder's Linear layers of a BERT-like classifier, by role."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PreTrainedModel

from llmos.contract.protocol import ErrorCode, KernelError


@dataclass(frozen=True, slots=True)
class Block:
    """One transformer layer's Linear layers (dotted names inside the model)."""

    query: str
    key: str
    value: str
    attention_out: str
    intermediate: str
    output: str
    head_size: int

    @property
    def linears(self) -> tuple[str, ...]:
        return (self.query, self.key, self.value, self.attention_out, self.intermediate,
                self.output)


def blocks(model: PreTrainedModel) -> list[Block]:
    """The encoder's blocks; KernelError(BAD_REQUEST) for a model that is not BERT-like."""
    prefix = model.base_model_prefix
    encoder = getattr(getattr(model, prefix, None), "encoder", None)
    layers = getattr(encoder, "layer", None)
    if layers is None or not all(hasattr(layer, "attention") and hasattr(layer, "intermediate")
                                 for layer in layers):
        raise KernelError(ErrorCode.BAD_REQUEST, f"{type(model).__name__} is not a BERT-like "
                          "encoder (layers with attention.self, intermediate, output)")
    head_size = model.config.hidden_size // model.config.num_attention_heads
    found = []
    for i in range(len(layers)):
        at = f"{prefix}.encoder.layer.{i}"
        found.append(Block(f"{at}.attention.self.query", f"{at}.attention.self.key",
                           f"{at}.attention.self.value", f"{at}.attention.output.dense",
                           f"{at}.intermediate.dense", f"{at}.output.dense", head_size))
    return found


def linear(model: nn.Module, name: str) -> nn.Linear:
    module = model.get_submodule(name)
    assert isinstance(module, nn.Linear), f"{name} is a {type(module).__name__}, not a Linear"
    return module
