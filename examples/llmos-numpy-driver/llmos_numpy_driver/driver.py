"""A BERT encoder forward pass in NumPy, float32, from safetensors weights.

Supports ``embed`` (mean-pooled, L2-normalised) for ``BertModel`` checkpoints such as
all-MiniLM-L6-v2. Padding to the longest input, truncation to the position table.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from llmos.contract.protocol import ErrorCode, KernelError
from llmos.drivers.base import Driver, LoadedModel, TaskOutput, check_task


def _erf(x: np.ndarray) -> np.ndarray:
    """Abramowitz-Stegun 7.1.26 (max error 1.5e-7): NumPy has no erf."""
    sign = np.sign(x)
    x = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
                                                                       + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-x * x))


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / np.float32(np.sqrt(2.0))))


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


@dataclass(slots=True)
class _Bert:
    weights: dict[str, np.ndarray]
    config: dict[str, Any]
    tokenizer: Tokenizer
    info: LoadedModel

    def w(self, name: str) -> np.ndarray:
        return self.weights[name]

    def linear(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self.w(f"{name}.weight").T + self.w(f"{name}.bias")

    def encode(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        eps = float(self.config.get("layer_norm_eps", 1e-12))
        heads = int(self.config["num_attention_heads"])
        batch, length = ids.shape
        x = (self.w("embeddings.word_embeddings.weight")[ids]
             + self.w("embeddings.position_embeddings.weight")[:length]
             + self.w("embeddings.token_type_embeddings.weight")[0])
        x = _layer_norm(x, self.w("embeddings.LayerNorm.weight"), self.w("embeddings.LayerNorm.bias"), eps)
        bias = ((1.0 - mask[:, None, None, :]) * np.float32(-1e9)).astype(np.float32)
        for i in range(int(self.config["num_hidden_layers"])):
            p = f"encoder.layer.{i}"

            def split(t: np.ndarray) -> np.ndarray:
                return t.reshape(batch, length, heads, -1).transpose(0, 2, 1, 3)

            q, k, v = (split(self.linear(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
            scores = q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(q.shape[-1])) + bias
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            context = (scores / scores.sum(-1, keepdims=True)) @ v
            context = context.transpose(0, 2, 1, 3).reshape(batch, length, -1)
            x = _layer_norm(x + self.linear(context, f"{p}.attention.output.dense"),
                            self.w(f"{p}.attention.output.LayerNorm.weight"),
                            self.w(f"{p}.attention.output.LayerNorm.bias"), eps)
            hidden = _gelu(self.linear(x, f"{p}.intermediate.dense"))
            x = _layer_norm(x + self.linear(hidden, f"{p}.output.dense"),
                            self.w(f"{p}.output.LayerNorm.weight"),
                            self.w(f"{p}.output.LayerNorm.bias"), eps)
        return x


class NumpyBertDriver(Driver):
    """``embed`` for BERT encoders; one device (``cpu``)."""

    name = "numpy"

    def __init__(self, device: str, threads: int) -> None:
        super().__init__(device, threads)
        if device != "cpu":
            raise KernelError(ErrorCode.DEVICE_FAILED, f"the numpy driver runs on cpu, not {device}")
        self._models: dict[str, _Bert] = {}

    def describe(self) -> dict[str, Any]:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return {"device": self.device, "framework": f"numpy {np.__version__}",
                "threads": self.threads, "memory_bytes": int(pages)}

    def load(self, handle: str, path: str, options: dict[str, Any]) -> LoadedModel:
        folder = Path(path)
        config = json.loads((folder / "config.json").read_text())
        if config.get("model_type") != "bert" or not (folder / "tokenizer.json").is_file():
            raise KernelError(ErrorCode.BAD_REQUEST,
                              "the numpy driver serves BERT encoders with a tokenizer.json")
        weights: dict[str, np.ndarray] = {}
        for file in sorted(folder.glob("*.safetensors")):
            weights.update({k.removeprefix("bert."): v.astype(np.float32)
                            for k, v in load_file(str(file)).items()})
        limit = int(config.get("max_position_embeddings", 512))
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.enable_truncation(limit)
        tokenizer.enable_padding(pad_id=int(config.get("pad_token_id", 0)))
        info = LoadedModel(tasks=["embed"], dim=int(config["hidden_size"]), max_tokens=limit,
                           parameters=sum(int(v.size) for k, v in weights.items()
                                          if not k.endswith("position_ids")))
        self._models[handle] = _Bert(weights, config, tokenizer, info)
        return info

    def unload(self, handle: str) -> None:
        self._models.pop(handle, None)

    def run(self, handle: str, task: str, inputs: list[str], options: dict[str, Any]) -> TaskOutput:
        model = self._models.get(handle)
        check_task(handle, model.info if model else None, task, self.device)
        assert model is not None
        encodings = model.tokenizer.encode_batch(inputs)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.float32)
        hidden = model.encode(ids, mask)
        pooled = (hidden * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
        pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
        return TaskOutput({"embeddings": pooled.astype(np.float32)}, int(mask.sum()))
