"""PyTorch driver: Hugging Face models in eager mode on CPU or CUDA.

Tasks: ``embed`` (mean-pooled over the attention mask, L2-normalised) and ``classify``
(softmax over the labels of a ``*ForSequenceClassification`` model) for encoders; inputs
are padded to the longest in the batch and truncated to the model's limit. ``generate``
for causal language models, through one continuous-batching engine per loaded model
(drivers/generation.py). Training (drivers/training.py) and the sessions plugins name by
qualname (compress, update, DDP: drivers/sessions.py) run in quanta, one session per job.
Weights load from safetensors only; remote code is never trusted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from llmos.contract.protocol import ErrorCode, KernelError

from .base import Driver, LoadedModel, TaskOutput, check_task, import_qualname
from .common import max_tokens
from .generation import GenerationEngine
from .sessions import Session, import_session
from .training import TrainingSession, evaluate_folder

#: Sequences a generative model runs at once unless the load says otherwise (max_seqs).
DEFAULT_MAX_SEQS = 16
#: The config.json key naming, as ``"package.module:function"``, the ``function(path) ->
#: PreTrainedModel`` that builds a model transformers cannot rebuild from its config alone
#: (written by the plugin that changed the model's structure; see :func:`load_hf`).
LOADER_KEY = "llmos_loader"


@dataclass(slots=True)
class _Entry:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    info: LoadedModel
    engine: GenerationEngine | None = None


def is_classifier(config: Any) -> bool:
    """True for configs of ``*ForSequenceClassification`` models."""
    return any(a.endswith("ForSequenceClassification") for a in config.architectures or [])


def is_causal_lm(config: Any) -> bool:
    """True for configs of ``*ForCausalLM`` models."""
    return any(a.endswith("ForCausalLM") for a in config.architectures or [])


def load_hf(path: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer from a local folder: safetensors only, no remote code, offline.
    A config that names a loader (:data:`LOADER_KEY`) is built by that function."""
    common: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    config = AutoConfig.from_pretrained(path, **common)
    loader = getattr(config, LOADER_KEY, None)
    if loader:  # e.g. layers reshaped by llmos compress: its plugin builds the model
        model = import_qualname(loader)(path)
    else:
        auto = (AutoModelForCausalLM if is_causal_lm(config)
                else AutoModelForSequenceClassification if is_classifier(config) else AutoModel)
        model = auto.from_pretrained(path, use_safetensors=True, **common)
    tokenizer = AutoTokenizer.from_pretrained(path, **common)
    return model.eval(), tokenizer


class TorchDriver(Driver):
    name = "torch"

    def __init__(self, device: str, threads: int) -> None:
        super().__init__(device, threads)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise KernelError(ErrorCode.DEVICE_FAILED, f"torch sees no CUDA device for {device}")
        torch.set_num_threads(threads)
        self._torch_device = torch.device(device)
        self._models: dict[str, _Entry] = {}
        #: Sessions of training and plugin jobs (compress, update, DDP) between quanta.
        self._sessions: dict[str, Session] = {}
        #: Finish events of generations whose model was unloaded, sent with the next step.
        self._orphaned: list[dict[str, Any]] = []

    def describe(self) -> dict[str, Any]:
        if self._torch_device.type == "cuda":
            memory = torch.cuda.get_device_properties(self._torch_device).total_memory
        else:
            memory = psutil.virtual_memory().total
        return {"device": self.device, "framework": f"torch {torch.__version__}",
                "threads": self.threads, "memory_bytes": int(memory)}

    def load(self, handle: str, path: str, options: dict[str, Any]) -> LoadedModel:
        model, tokenizer = load_hf(path)
        model.to(self._torch_device)
        if is_causal_lm(model.config):
            return self._load_generative(handle, model, tokenizer, options)
        labels: list[str] = []
        tasks = ["embed"]
        if is_classifier(model.config):
            id2label = model.config.id2label
            labels = [str(id2label[i]) for i in range(len(id2label))]
            tasks.append("classify")
        info = LoadedModel(
            tasks=tasks, labels=labels, dim=int(model.config.hidden_size),
            max_tokens=max_tokens(model.config, tokenizer),
            parameters=sum(p.numel() for p in model.parameters()),
        )
        self._models[handle] = _Entry(model, tokenizer, info)
        return info

    def _load_generative(self, handle: str, model: PreTrainedModel,
                         tokenizer: PreTrainedTokenizerBase, options: dict[str, Any]) -> LoadedModel:
        precision = options.get("precision", "f32")
        if precision == "bf16":
            model.to(torch.bfloat16)
        sizes = {} if options.get("prefix_cache_mb") is None else {
            "prefix_cache_bytes": int(options["prefix_cache_mb"]) * 2**20}
        engine = GenerationEngine(model, tokenizer, int(options.get("max_seqs") or DEFAULT_MAX_SEQS),
                                  **sizes)
        info = LoadedModel(tasks=["generate"], max_tokens=engine.context,
                           parameters=sum(p.numel() for p in model.parameters()),
                           precision=precision)
        self.unload(handle)
        self._models[handle] = _Entry(model, tokenizer, info, engine)
        return info

    # --- generation ---------------------------------------------------------------------

    def generate(self, handle: str, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        entry = self._models.get(handle)
        check_task(handle, entry.info if entry else None, "generate", self.device)
        assert entry is not None and entry.engine is not None
        events = []
        for request in requests:
            try:
                entry.engine.submit(entry.engine.prepare(int(request["id"]), request))
            except KernelError as exc:
                events.append({"id": request["id"], "finish": "error", "code": str(exc.code),
                               "message": exc.message})
        return events

    def _engines(self) -> list[GenerationEngine]:
        return [e.engine for e in self._models.values() if e.engine is not None]

    @property
    def generating(self) -> bool:
        return bool(self._orphaned) or any(engine.busy for engine in self._engines())

    def step(self) -> list[dict[str, Any]]:
        events, self._orphaned = self._orphaned, []
        return events + [event for engine in self._engines() if engine.busy
                         for event in engine.step()]

    def cancel(self, ids: list[int]) -> list[dict[str, Any]]:
        wanted = set(ids)
        return [event for engine in self._engines() for event in engine.cancel(wanted)]

    def reprioritize(self, seq_id: int, priority: int) -> None:
        for engine in self._engines():
            engine.reprioritize(seq_id, priority)

    def train(self, job: str, spec: dict[str, Any], seconds: float) -> dict[str, Any]:
        return self._quantum(job, lambda: TrainingSession.start(spec, self.threads), seconds)

    def run_session(self, job: str, session: str, spec: dict[str, Any],
                    seconds: float) -> dict[str, Any]:
        return self._quantum(job, lambda: import_session(session)(spec, self.threads), seconds)

    def _quantum(self, job: str, start: Callable[[], Session], seconds: float) -> dict[str, Any]:
        """One quantum of job ``job``'s session (started on the first); forgotten when done
        or failed."""
        session = self._sessions.get(job)
        if session is None:
            session = self._sessions[job] = start()
        try:
            progress = session.run(seconds)
        except BaseException:
            self.forget(job)
            raise
        if session.done:
            self.forget(job)
        return progress

    def forget(self, job: str) -> None:
        session = self._sessions.pop(job, None)
        if session is not None:
            session.close()

    def evaluate(self, path: str, data: dict[str, str], split: str, seed: int) -> dict[str, Any]:
        return evaluate_folder(path, data, split, seed)

    def unload(self, handle: str) -> None:
        entry = self._models.pop(handle, None)
        if entry is not None and entry.engine is not None and entry.engine.busy:
            # Finish what it was generating as cancelled; the events go out with the next step.
            running = {s.id for s in [*entry.engine.waiting, *entry.engine.batch.seqs]}
            for event in entry.engine.cancel(running):
                self._orphaned.append({**event, "message": f"{handle} was unloaded"})
        if self._torch_device.type == "cuda":
            torch.cuda.empty_cache()

    def run(self, handle: str, task: str, inputs: list[str], options: dict[str, Any]) -> TaskOutput:
        entry = self._models.get(handle)
        check_task(handle, entry.info if entry else None, task, self.device)
        assert entry is not None
        batch = entry.tokenizer(
            inputs, padding="longest", truncation=True, max_length=entry.info.max_tokens,
            return_tensors="pt",
        ).to(self._torch_device)
        tokens = int(batch["attention_mask"].sum())
        with torch.inference_mode():
            if task == "embed":
                encoder = getattr(entry.model, entry.model.base_model_prefix, entry.model)
                hidden = encoder(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out = {"embeddings": torch.nn.functional.normalize(pooled, dim=-1)}
            else:
                logits = entry.model(**batch).logits
                out = {"probs": torch.softmax(logits.float(), dim=-1)}
        return TaskOutput({k: v.float().cpu().numpy() for k, v in out.items()}, tokens)
