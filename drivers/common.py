"""What the drivers that run an exported graph (ONNX Runtime, OpenVINO) share.

:class:`ExportedGraphDriver` loads a model folder through :func:`llmos.drivers.export.ensure_artifact`,
tokenizes like the torch driver (pad to the longest input, truncate to the model's limit) and
post-processes in numpy with the torch driver's semantics: ``embed`` is the mean of
``last_hidden_state`` over the attention mask, L2-normalised; ``classify`` is a softmax over
``logits``. A subclass only opens the artifact (:meth:`ExportedGraphDriver.open_graph`).
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from .base import Driver, LoadedModel, TaskOutput, check_task
from .export import ensure_artifact, read_meta

#: ``run(feeds, output_names)`` -> ``{output_name: array}``.
GraphRunner = Callable[[dict[str, np.ndarray], list[str]], dict[str, np.ndarray]]


def mean_pool_normalize(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of ``hidden`` (batch, seq, dim) over positions where ``mask`` (batch, seq) is 1,
    L2-normalised per row; float32 (batch, dim). As the torch driver: eps 1e-9 on the token
    count and 1e-12 on the norm."""
    hidden = hidden.astype(np.float32, copy=False)
    weights = mask.astype(np.float32)[..., None]
    pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    norms = np.linalg.norm(pooled, axis=-1, keepdims=True)
    return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, computed and returned in float32."""
    logits = logits.astype(np.float32, copy=False)
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


def tokenize(tokenizer: PreTrainedTokenizerBase, inputs: list[str], max_tokens: int,
             names: list[str]) -> tuple[dict[str, np.ndarray], int]:
    """The int64 arrays in ``names`` for a batch padded to its longest input and truncated to
    ``max_tokens``, and the number of real (unpadded) tokens."""
    batch = tokenizer(inputs, padding="longest", truncation=True, max_length=max_tokens,
                      return_tensors="np")
    feeds = {name: np.asarray(batch[name], dtype=np.int64) for name in names}
    return feeds, int(batch["attention_mask"].sum())


def load_config_and_tokenizer(path: Path) -> tuple[PretrainedConfig, PreTrainedTokenizerBase]:
    """Config and tokenizer of a local folder: offline, no remote code."""
    common: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    return (AutoConfig.from_pretrained(path, **common),
            AutoTokenizer.from_pretrained(path, **common))


def max_tokens(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> int:
    """Longest input: the smaller of the position table (512 if unknown) and the tokenizer's."""
    limit = getattr(config, "max_position_embeddings", None) or 512
    return int(min(limit, tokenizer.model_max_length))


@dataclass(slots=True)
class Graph:
    """An opened artifact: how to run it, its input and output names, its compute precision."""

    run: GraphRunner
    inputs: list[str]
    outputs: list[str]
    precision: str


@dataclass(slots=True)
class _Entry:
    graph: Graph
    tokenizer: PreTrainedTokenizerBase
    info: LoadedModel


class ExportedGraphDriver(Driver):
    """A driver that runs the exported ``artifact_format`` graph of a model folder."""

    #: Format passed to :func:`ensure_artifact` (``"onnx"`` or ``"openvino"``).
    artifact_format: ClassVar[str]

    def __init__(self, device: str, threads: int) -> None:
        super().__init__(device, threads)
        self._models: dict[str, _Entry] = {}
        #: A fast tokenizer may not be called from two threads at once (streams).
        self._tokenizing = threading.Lock()

    @abstractmethod
    def open_graph(self, artifact: Path, options: dict[str, Any],
                   tokenizer: PreTrainedTokenizerBase) -> Graph:
        """Open the artifact file on this driver's device (``tokenizer``: the model's, for
        calibration); KernelError for bad options."""

    def load(self, handle: str, path: str, options: dict[str, Any]) -> LoadedModel:
        """Export (or reuse) the artifact, open it; ``classify`` iff the graph has logits."""
        artifact, _ = ensure_artifact(Path(path), self.artifact_format)
        config, tokenizer = load_config_and_tokenizer(Path(path))
        graph = self.open_graph(artifact, options, tokenizer)
        tasks, labels = ["embed"], []
        if "logits" in graph.outputs:
            tasks.append("classify")
            labels = [str(config.id2label[i]) for i in range(len(config.id2label))]
        info = LoadedModel(
            tasks=tasks, labels=labels, dim=int(config.hidden_size),
            max_tokens=max_tokens(config, tokenizer),
            parameters=int(read_meta(artifact)["parameters"]), precision=graph.precision,
        )
        self._models[handle] = _Entry(graph, tokenizer, info)
        return info

    def unload(self, handle: str) -> None:
        self._models.pop(handle, None)

    def run(self, handle: str, task: str, inputs: list[str], options: dict[str, Any]) -> TaskOutput:
        entry = self._models.get(handle)
        check_task(handle, entry.info if entry else None, task, self.device)
        assert entry is not None
        with self._tokenizing:
            feeds, tokens = tokenize(entry.tokenizer, inputs, entry.info.max_tokens,
                                     entry.graph.inputs)
        if task == "embed":
            hidden = entry.graph.run(feeds, ["last_hidden_state"])["last_hidden_state"]
            arrays = {"embeddings": mean_pool_normalize(hidden, feeds["attention_mask"])}
        else:
            arrays = {"probs": softmax(entry.graph.run(feeds, ["logits"])["logits"])}
        return TaskOutput(arrays, tokens)
