"""Driver ``pipeline``: one stage of a model split by layers across driver hosts.

``load`` with options ``stage`` (1-based) and ``stages`` keeps a contiguous slice of the
encoder's layers (layer ``i`` of ``L`` goes to stage ``i * stages // L + 1``): the first
stage also keeps the embeddings and tokenizes, the last keeps the pooler and the head.

* ``run`` (first stage): tokenize like the ``torch`` driver, embed, run its layers; the
  result is the activations, ``hidden`` (float32, batch × tokens × width) and ``mask``
  (int64, batch × tokens), which the kernel sends to the next stage as raw tensor frames;
* ``run_stage`` (every later stage): the previous stage's ``hidden`` and ``mask`` through
  its layers; the last stage returns what the ``torch`` driver returns (``embeddings``:
  mean-pooled, L2-normalised; ``probs``: softmax of the logits).

The attention mask is rebuilt from ``mask`` by the model's own code in every stage, so the
split model computes exactly what the whole one does. BERT-style encoders only (a base
model with ``embeddings``, ``encoder.layer`` and ``pooler``, and for ``classify`` a BERT
head: MiniLM, BERT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llmos.contract.protocol import ErrorCode, KernelError
from llmos.drivers.base import Driver, LoadedModel, TaskOutput, check_task
from llmos.drivers.common import max_tokens
from llmos.drivers.pytorch import is_classifier, load_hf


class PassThrough(torch.nn.Module):
    """Stands in for the embeddings of a later stage: its input is already embedded."""

    def forward(self, inputs_embeds: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        assert inputs_embeds is not None
        return inputs_embeds


@dataclass(slots=True)
class _Stage:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    info: LoadedModel
    index: int
    count: int

    @property
    def first(self) -> bool:
        return self.index == 1

    @property
    def last(self) -> bool:
        return self.index == self.count


def layer_slice(layers: int, stage: int, stages: int) -> range:
    """The layers stage ``stage`` (1-based) of ``stages`` keeps: contiguous, balanced."""
    owner = [i * stages // layers + 1 for i in range(layers)]
    kept = [i for i in range(layers) if owner[i] == stage]
    return range(kept[0], kept[-1] + 1)


def split(model: PreTrainedModel, stage: int, stages: int) -> range:
    """Cut ``model`` down to its stage in place; the layers it kept."""
    base = getattr(model, model.base_model_prefix, model)
    if not all(hasattr(base, a) for a in ("embeddings", "encoder", "pooler")) or \
            not hasattr(base.encoder, "layer"):
        raise KernelError(ErrorCode.BAD_REQUEST, f"{type(model).__name__} cannot be split into "
                          "stages (BERT-style encoders only)")
    layers = len(base.encoder.layer)
    if not 1 <= stage <= stages <= layers:
        raise KernelError(ErrorCode.BAD_REQUEST, f"cannot make stage {stage} of {stages} from "
                          f"{layers} layers")
    kept = layer_slice(layers, stage, stages)
    base.encoder.layer = torch.nn.ModuleList(base.encoder.layer[i] for i in kept)
    if stage > 1:
        base.embeddings = PassThrough()
    if stage < stages:
        base.pooler = None
    return kept


class StageDriver(Driver):
    name = "pipeline"

    def __init__(self, device: str, threads: int) -> None:
        super().__init__(device, threads)
        torch.set_num_threads(threads)
        self._torch_device = torch.device(device)
        self._stages: dict[str, _Stage] = {}

    def describe(self) -> dict[str, Any]:
        return {"device": self.device, "framework": f"torch {torch.__version__}",
                "threads": self.threads, "memory_bytes": int(psutil.virtual_memory().total)}

    def load(self, handle: str, path: str, options: dict[str, Any]) -> LoadedModel:
        stage, stages = int(options.get("stage", 1)), int(options.get("stages", 1))
        model, tokenizer = load_hf(path)
        labels = [str(model.config.id2label[i]) for i in range(len(model.config.id2label))] \
            if is_classifier(model.config) else []
        tokens = max_tokens(model.config, tokenizer)
        split(model, stage, stages)
        model.to(self._torch_device)
        info = LoadedModel(tasks=["embed", *(["classify"] if labels else [])], labels=labels,
                           dim=int(model.config.hidden_size), max_tokens=tokens,
                           parameters=sum(p.numel() for p in model.parameters()))
        self._stages[handle] = _Stage(model, tokenizer, info, stage, stages)
        return info

    def unload(self, handle: str) -> None:
        self._stages.pop(handle, None)

    def _get(self, handle: str, task: str) -> _Stage:
        stage = self._stages.get(handle)
        check_task(handle, stage.info if stage else None, task, self.device)
        assert stage is not None
        return stage

    def run(self, handle: str, task: str, inputs: list[str], options: dict[str, Any]) -> TaskOutput:
        stage = self._get(handle, task)
        if not stage.first:
            raise KernelError(ErrorCode.INTERNAL, f"{handle}: run goes to the first stage")
        batch = stage.tokenizer(inputs, padding="longest", truncation=True,
                                max_length=stage.info.max_tokens, return_tensors="pt")
        batch = batch.to(self._torch_device)
        tokens = int(batch["attention_mask"].sum())
        base = getattr(stage.model, stage.model.base_model_prefix, stage.model)
        with torch.inference_mode():
            outputs = base(**batch)
        if stage.last:  # a one-stage pipeline is the whole model
            return self._head(stage, task, outputs, batch["attention_mask"], tokens)
        return TaskOutput({"hidden": outputs.last_hidden_state.float().cpu().numpy(),
                           "mask": batch["attention_mask"].to(torch.int64).cpu().numpy()}, tokens)

    def run_stage(self, handle: str, task: str, arrays: dict[str, np.ndarray],
                  options: dict[str, Any]) -> TaskOutput:
        stage = self._get(handle, task)
        hidden = torch.from_numpy(np.array(arrays["hidden"])).to(self._torch_device)
        mask = torch.from_numpy(np.array(arrays["mask"])).to(self._torch_device)
        base = getattr(stage.model, stage.model.base_model_prefix, stage.model)
        with torch.inference_mode():
            outputs = base(inputs_embeds=hidden, attention_mask=mask)
        if stage.last:
            return self._head(stage, task, outputs, mask, 0)
        return TaskOutput({"hidden": outputs.last_hidden_state.float().cpu().numpy(),
                           "mask": arrays["mask"]}, 0)

    @staticmethod
    def _head(stage: _Stage, task: str, outputs: Any, mask: torch.Tensor,
              tokens: int) -> TaskOutput:
        """The last stage's output, computed as the ``torch`` driver and the model do."""
        with torch.inference_mode():
            if task == "embed":
                hidden = outputs.last_hidden_state
                weights = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
                out = torch.nn.functional.normalize(pooled, dim=-1)
                return TaskOutput({"embeddings": out.float().cpu().numpy()}, tokens)
            logits = stage.model.classifier(stage.model.dropout(outputs.pooler_output))
            return TaskOutput({"probs": torch.softmax(logits.float(), -1).cpu().numpy()}, tokens)
