"""A model on its way through a recipe, and how to run, measure and save it.

A :class:`Candidate` starts as the parent's torch model. Torch-level steps (pruning,
low-rank, torch int8, fp16/bf16) change ``model``; a step that targets a runtime (ONNX
Runtime or OpenVINO int8) leaves a ``graph`` file and sets ``form``, after which only
steps of that runtime apply. :meth:`Candidate.predictor` runs whichever form it is, so
the gate measures exactly what will be served.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llmos.contract.protocol import ErrorCode, KernelError

from .structure import needs_rebuild, quantize_dynamic, structure_of

#: Form -> the drivers that can serve a version in that form.
DRIVERS: dict[str, list[str]] = {"torch": ["torch", "onnxruntime", "openvino"],
                                 "onnx": ["onnxruntime"], "openvino": ["openvino"]}
#: Form -> the graph file a version of that form carries (the drivers' export reuses it).
GRAPH_FILES = {"onnx": "model.onnx", "openvino": "openvino_model.xml"}

#: ``predict(feeds) -> logits``, feeds as int64 numpy arrays.
Predict = Callable[[dict[str, np.ndarray]], np.ndarray]


@dataclass(slots=True)
class StepContext:
    """What a step may use: scratch space, training rows, token limit, threads."""

    workdir: Path
    train_texts: list[str]
    train_targets: list[int]
    max_tokens: int
    threads: int
    seed: int = 0
    #: The parent model (eval mode, never modified), for distillation.
    teacher: PreTrainedModel | None = None

    def calibration(self, samples: int) -> list[str]:
        return self.train_texts[:samples]


@dataclass(slots=True)
class Candidate:
    """The model being compressed: a torch model, or an exported graph of it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    form: str = "torch"
    graph: Path | None = None
    #: Per-step entries for the report (e.g. per-layer ranks).
    notes: list[dict[str, Any]] = field(default_factory=list)

    def require_torch(self, step: str) -> None:
        """KernelError(BAD_REQUEST) if the model has already become an exported graph."""
        if self.form != "torch":
            raise KernelError(ErrorCode.BAD_REQUEST,
                              f"{step} needs a torch model, but an earlier step made a {self.form} "
                              "graph: put runtime quantization last in the recipe")

    def feeds(self, texts: list[str], max_tokens: int, pad: bool = False) -> dict[str, np.ndarray]:
        """Token ids and mask of at most ``max_tokens``, padded to the longest text (or, with
        ``pad``, to ``max_tokens``)."""
        batch = self.tokenizer(texts, truncation=True, return_tensors="np", max_length=max_tokens,
                               padding="max_length" if pad else "longest")
        return {"input_ids": batch["input_ids"].astype(np.int64),
                "attention_mask": batch["attention_mask"].astype(np.int64)}

    def predictor(self, threads: int) -> Predict:
        """A function computing logits in this candidate's form, on ``threads`` threads."""
        if self.form == "onnx":
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            session = onnxruntime.InferenceSession(str(self.graph), options,
                                                   providers=["CPUExecutionProvider"])
            return lambda feeds: session.run(["logits"], feeds)[0]
        if self.form == "openvino":
            import openvino

            compiled = openvino.Core().compile_model(
                str(self.graph), "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                         "INFERENCE_NUM_THREADS": threads})
            request = compiled.create_infer_request()
            return lambda feeds: request.infer(feeds)["logits"]
        model = self.model.eval()
        if structure_of(model).get("torch_int8"):
            model = quantize_dynamic(copy.deepcopy(model))

        def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
            torch.set_num_threads(threads)
            with torch.inference_mode():
                tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
                return model(**tensors).logits.float().numpy()

        return run

    def save(self, folder: Path) -> list[str]:
        """Write the version folder (config, tokenizer, weights or graph); the drivers."""
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.tokenizer.save_pretrained(folder)
        if self.form == "torch":
            if needs_rebuild(self.model.config):
                _save_state(self.model, folder)
            else:
                self.model.save_pretrained(folder, safe_serialization=True)
            return ["torch"] if _torch_only(self.model) else DRIVERS["torch"]
        assert self.graph is not None
        self.model.config.save_pretrained(folder)
        target = folder / GRAPH_FILES[self.form]
        shutil.copy2(self.graph, target)
        if self.form == "openvino":
            shutil.copy2(self.graph.with_suffix(".bin"), target.with_suffix(".bin"))
        parameters = sum(p.numel() for p in self.model.parameters())
        (folder / "meta.json").write_text(json.dumps({"format": self.form, "prebuilt": True,
                                                      "parameters": parameters}))
        return DRIVERS[self.form]


def _torch_only(model: PreTrainedModel) -> bool:
    """torch-int8 and half-precision models are served by torch alone."""
    structure = getattr(model.config, "llmos_compression", None) or {}
    return bool(structure.get("torch_int8")) or model.dtype != torch.float32


def _save_state(model: PreTrainedModel, folder: Path) -> None:
    """config.json with the structure record, and the weights as safetensors."""
    from safetensors.torch import save_file

    model.config.save_pretrained(folder)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
