"""Continuous batching for causal language models, with priorities and preemption.

One :class:`GenerationEngine` serves one loaded model inside a driver host. The host calls
:meth:`GenerationEngine.step` between its other tasks and sends each step's events at once;
a step is one forward pass, either

1. a prefill: it admits waiting sequences in priority order (nice value, then arrival)
   while the batch has room, preempting the least urgent running sequence when a strictly
   more urgent one waits and the batch is full; new prompts are prefilled together, at
   most ``max_prefill_tokens`` prompt tokens a step, so running sequences never stall for
   long: a prompt longer than that is prefilled in chunks of that size, one chunk a step.
   Their first tokens go out before the next pass; or
2. a decode: one token for every running sequence in a single forward pass.

While sequences wait and others run, prefill and decode steps alternate.

Sequences join and leave the running batch between steps. The batch keeps one KV cache
(:class:`~llmos.drivers.kvcache.RowCache`: preallocated, written in place, grown
geometrically), left-padded to a common length with an attention mask, so every row attends
only to its own tokens. A preempted sequence leaves with its own rows of the cache (copied out, kept in
host memory) and the token it sampled last; when it resumes, that state is padded back
into the batch and decoding continues where it stopped: nothing is recomputed, and under
greedy decoding its output equals an uninterrupted run's.

Events returned by :meth:`step` (and :meth:`cancel`) are plain dicts keyed by sequence id:
``{"id", "text", "tokens", "token"}`` for new text (``text`` may be empty while a multi-byte
character or a possible stop string is incomplete; ``token`` is the sampled token's id, which
the kernel keeps so that a request can resume on another host), ``{"id", "preempted": True}``,
and one final ``{"id", "finish", ...}`` with the whole text and the usage, or with reason
``error``, a ``code`` and a ``message``.

Faults stay with the sequence that met them: a failure while sampling, detokenizing or
matching stop strings for one sequence ends that sequence with an ``error`` event; a forward
pass that fails ends the sequences in that pass (the others keep their place); nothing here
raises out of :meth:`step` or :meth:`cancel`, so the host serves on. Every path that touches
the engine's tensors runs under :func:`torch.inference_mode` (the cache's tensors are
inference tensors: updating them outside it raises).

A request may carry ``resume``: ``{"tokens": [...], "sent": n}``, the tokens an earlier host
generated for it before it died and the characters of their text the client already has. The
prompt and those tokens are prefilled together and generation continues after them; text is
sent from character ``n`` on, so the client receives every character exactly once and, under
greedy decoding, the text equals an uninterrupted run's.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llmos.contract.protocol import ErrorCode, KernelError
from llmos.contract.states import FinishReason

from .kvcache import KV, RowCache
from .prefixes import DEFAULT_MAX_BYTES, PrefixCache, PrefixHit

#: Roles a chat message may have.
ROLES = ("system", "user", "assistant")

_arrivals = itertools.count()

log = logging.getLogger("llmos.generation")


#: Sampling when neither the request nor the model's generation config says: a cooler
#: temperature and a nucleus than plain sampling (1.0, 1.0), on which small chat models
#: wander off the question (the llama.cpp server and Ollama default near these too).
DEFAULT_TEMPERATURE, DEFAULT_TOP_P = 0.7, 0.9


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    """The temperature and top_p a request that leaves them out gets, and where they come
    from (``model``: the model's generation_config.json; ``llmos``: the constants above)."""

    temperature: float
    top_p: float
    source: str

    @classmethod
    def of(cls, model: PreTrainedModel) -> SamplingDefaults:
        """The model's own sampling settings when its generation config sets any (greedy
        when it says ``do_sample: false`` explicitly), else DEFAULT_TEMPERATURE/TOP_P."""
        config = getattr(model, "generation_config", None)
        given = config.to_diff_dict() if config is not None else {}
        if "do_sample" in given and not given["do_sample"]:
            return cls(0.0, 1.0, "model")
        if "temperature" in given or "top_p" in given:
            return cls(float(given.get("temperature", 1.0)), float(given.get("top_p", 1.0)),
                       "model")
        return cls(DEFAULT_TEMPERATURE, DEFAULT_TOP_P, "llmos")


@dataclass(frozen=True, slots=True)
class Sampling:
    """How to pick tokens. ``temperature`` 0 is greedy decoding."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(eq=False, slots=True)
class Sequence:
    """One generation request and its state while it waits, runs or is preempted."""

    id: int
    prompt_ids: list[int]
    sampling: Sampling
    priority: int = 0
    arrival: int = field(default_factory=lambda: next(_arrivals))
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)
    #: Characters of the text already sent.
    sent: int = 0
    #: The token sampled last, not yet in the KV cache (None before prefill).
    pending: int | None = None
    #: Per layer (keys, values) of this sequence alone while it is preempted.
    swapped: list[KV] | None = None
    #: The cache of a long prompt while it is prefilled chunk by chunk, and its progress.
    partial: RowCache | None = None
    prefilled: int = 0
    #: Prompt tokens whose keys and values came from the prefix cache.
    cached: int = 0
    #: Generated tokens it arrived with (``resume``): prefilled after the prompt.
    resumed: int = 0
    preemptions: int = 0
    cpu_seconds: float = 0.0
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    @property
    def rank(self) -> tuple[int, int]:
        """Lower runs first: nice value, then arrival order."""
        return (self.priority, self.arrival)

    @property
    def feed(self) -> list[int]:
        """What a prefill feeds: the prompt, then the tokens it resumed with."""
        return self.prompt_ids + self.generated[:self.resumed] if self.resumed else self.prompt_ids


@dataclass(slots=True)
class _Batch:
    """Sequences, one row each, and their shared left-padded KV cache."""

    seqs: list[Sequence]
    cache: RowCache
    #: 1 for a real token, 0 for left padding; shape (rows, cache length).
    mask: torch.Tensor

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows``, and none of the padding columns they all share."""
        mask = self.mask[torch.tensor(rows, dtype=torch.long)]
        trim = int((mask == 0).all(0).long().cumprod(0).sum())  # leading all-padding columns
        self.cache.keep(rows, trim)
        self.seqs = [self.seqs[i] for i in rows]
        self.mask = mask[:, trim:]


class GenerationEngine:
    """Continuous batching over one causal LM (see the module docstring)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 max_seqs: int = 16, max_prefill_tokens: int = 1024,
                 prefix_cache_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_seqs = max_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.prefixes = PrefixCache(prefix_cache_bytes)
        self.context = int(getattr(model.config, "max_position_embeddings", 2048))
        self.sampling_defaults = SamplingDefaults.of(model)
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.layers = int(model.config.get_text_config().num_hidden_layers)
        self.waiting: list[Sequence] = []
        self.batch = _Batch([], RowCache(self.layers, self.context),
                            torch.zeros(0, 0, dtype=torch.long))
        #: The long prompt being prefilled in chunks (one at a time), if any.
        self.chunking: Sequence | None = None
        #: The last pass was a prefill: the next one decodes (see :meth:`step`).
        self._decode_next = False
        self.device = next(model.parameters()).device

    # --- requests -----------------------------------------------------------------------

    def prepare(self, seq_id: int, request: dict[str, Any]) -> Sequence:
        """A sequence for ``request`` (``prompt`` or chat ``messages``, sampling options;
        a temperature or top_p left out or None is the engine's :class:`SamplingDefaults`);
        KernelError(BAD_REQUEST) for an empty prompt, bad messages or too long a prompt."""
        temperature, top_p = request.get("temperature"), request.get("top_p")
        sampling = Sampling(
            max_tokens=int(request.get("max_tokens") or 16),
            temperature=float(self.sampling_defaults.temperature if temperature is None
                              else temperature),
            top_p=float(self.sampling_defaults.top_p if top_p is None else top_p),
            stop=tuple(s for s in request.get("stop") or () if s),
            seed=request.get("seed"),
            ignore_eos=bool(request.get("ignore_eos", False)),
        )
        ids = self.encode(request.get("prompt"), request.get("messages"))
        resume = request.get("resume") or {}
        resumed = [int(t) for t in resume.get("tokens") or ()]
        if len(ids) + sampling.max_tokens > self.context:
            raise KernelError(ErrorCode.BAD_REQUEST,
                              f"the prompt has {len(ids)} tokens; with max_tokens "
                              f"{sampling.max_tokens} it exceeds the model's context of "
                              f"{self.context} tokens")
        generator = None
        if sampling.temperature > 0:
            seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(6))
            generator = torch.Generator().manual_seed(seed)
        return Sequence(seq_id, ids, sampling, int(request.get("priority") or 0),
                        generator=generator, generated=resumed, resumed=len(resumed),
                        sent=int(resume.get("sent") or 0))

    def encode(self, prompt: str | None, messages: list[dict[str, Any]] | None) -> list[int]:
        """Token ids of a raw prompt, or of chat messages through the model's template."""
        if messages:
            if not getattr(self.tokenizer, "chat_template", None):
                raise KernelError(ErrorCode.BAD_REQUEST, "this model has no chat template; "
                                  "send a prompt instead of messages")
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        elif prompt:
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            raise KernelError(ErrorCode.BAD_REQUEST, "give a non-empty prompt or messages")
        if not ids:
            raise KernelError(ErrorCode.BAD_REQUEST, "the prompt has no tokens")
        return list(ids)

    def submit(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def cancel(self, ids: set[int]) -> list[dict[str, Any]]:
        """Drop these sequences wherever they are; their ``cancelled`` finish events. Never
        raises: if the batch cannot be cut, its other rows end with an error event."""
        events = [self._finish(s, FinishReason.CANCELLED) for s in self.waiting if s.id in ids]
        self.waiting = [s for s in self.waiting if s.id not in ids]
        if self.chunking is not None and self.chunking.id in ids:
            events.append(self._finish(self.chunking, FinishReason.CANCELLED))
            self.chunking = None
        rows = [i for i, s in enumerate(self.batch.seqs) if s.id in ids]
        events += [self._finish(self.batch.seqs[i], FinishReason.CANCELLED) for i in rows]
        try:
            with torch.inference_mode():
                self._drop_rows(set(rows))
        except Exception as exc:
            log.exception("cancel could not cut the batch")
            events += self._abandon_batch(exc)
        return events

    def reprioritize(self, seq_id: int, priority: int) -> None:
        for seq in [*self.waiting, *self.batch.seqs, *([self.chunking] if self.chunking else [])]:
            if seq.id == seq_id:
                seq.priority = priority

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.batch.seqs or self.chunking)

    # --- one step -----------------------------------------------------------------------

    def step(self) -> list[dict[str, Any]]:
        """One forward pass. While prompts wait (or a long one is half prefilled) and the
        last pass was not a prefill: admit them (maybe preempting) and prefill, so their
        first tokens leave before any decode pass; otherwise decode one token for every
        running row. Prefill and decode passes alternate while both have work."""
        events: list[dict[str, Any]] = []
        waiting = list(self.waiting)
        try:
            with torch.inference_mode():
                if not self._decode_next and (self.waiting or self.chunking is not None):
                    if self._admit(events):
                        self._decode_next = bool(self.batch.seqs)
                        return events
                if self.batch.seqs:
                    self._decode(events)
                self._decode_next = False
        except Exception as exc:  # a failed pass ends its own sequences, not the host
            log.exception("a generation step failed")
            ended = {int(e["id"]) for e in events if "finish" in e}
            admitted = [s for s in waiting if s not in self.waiting and s not in self.batch.seqs
                        and s is not self.chunking and s.id not in ended]
            events += [self._error(s, exc) for s in admitted]
            events += self._abandon_batch(exc, ended)
        return events

    def _abandon_batch(self, exc: Exception, ended: set[int] | None = None) -> list[dict[str, Any]]:
        """End every running sequence (and the one being chunked) with an error event and
        start an empty batch: after a failed pass its cache can no longer be trusted."""
        seqs = [*self.batch.seqs, *([self.chunking] if self.chunking is not None else [])]
        self.batch = _Batch([], RowCache(self.layers, self.context), torch.zeros(0, 0, dtype=torch.long))
        self.chunking = None
        self._decode_next = False
        return [self._error(s, exc) for s in seqs if s.id not in (ended or set())]

    @staticmethod
    def _error(seq: Sequence, exc: BaseException) -> dict[str, Any]:
        """The finish event of a sequence that a fault ended."""
        return {"id": seq.id, "finish": "error", "code": str(ErrorCode.INTERNAL),
                "message": f"generation failed: {type(exc).__name__}: {exc}"}

    def _admit(self, events: list[dict[str, Any]]) -> bool:
        """Admit waiting sequences in rank order; True if a prefill pass ran."""
        fresh: list[Sequence] = []
        resumed: list[Sequence] = []
        budget = self.max_prefill_tokens
        running = list(self.batch.seqs)
        while self.waiting:
            best = min(self.waiting, key=lambda s: s.rank)
            taken = len(running) + len(fresh) + len(resumed) + (self.chunking is not None)
            if taken >= self.max_seqs:
                victim = max(running, key=lambda s: s.rank, default=None)
                if victim is None or best.priority >= victim.priority:
                    break
                self._preempt(victim)
                running.remove(victim)
                events.append({"id": victim.id, "preempted": True})
            if best.swapped is not None:
                resumed.append(best)
            elif len(best.feed) > self.max_prefill_tokens:
                if self.chunking is not None:
                    break  # one long prompt at a time
                self.chunking = best
            else:
                if fresh and len(best.feed) > budget:
                    break
                budget -= len(best.feed)
                fresh.append(best)
            self.waiting.remove(best)
        parts = [self._resume_part(s) for s in resumed]
        chunked = self.chunking is not None  # (it is None again once the prompt is in)
        if self.chunking is not None:
            part = self._prefill_chunk(self.chunking, events)
            if self.chunking.partial is None:  # the whole prompt is in
                self.chunking = None
                if part is not None:
                    parts.append(part)
        if fresh:
            part = self._prefill(fresh, events)
            if part is not None:
                parts.append(part)
        if parts:
            self._merge(parts)
        return bool(fresh) or chunked

    def _preempt(self, seq: Sequence) -> None:
        """Copy ``seq``'s own cache rows out of the batch and put it back in the queue."""
        row = self.batch.seqs.index(seq)
        seq.swapped = self.batch.cache.row(row, int((self.batch.mask[row] == 0).sum()))
        seq.preemptions += 1
        self._drop_rows({row})
        self.waiting.append(seq)

    def _resume_part(self, seq: Sequence) -> _Batch:
        assert seq.swapped is not None
        layers, seq.swapped = seq.swapped, None
        length = layers[0][0].shape[2]
        return _Batch([seq], RowCache.wrap(layers, self.context), torch.ones(1, length, dtype=torch.long))

    def _prefill(self, seqs: list[Sequence], events: list[dict[str, Any]]) -> _Batch | None:
        """Run the prompts of ``seqs`` together, each from the end of its longest cached
        prefix; keep their new whole blocks in the prefix cache; sample each one's first
        token.

        Row ``i``'s cache is laid out ``[padding, cached prefix | padding, rest of the
        prompt]``: the cached prefixes are right-aligned in the first ``cached`` columns, the
        rest right-aligned in the ``longest`` columns fed now; the mask hides both paddings.
        """
        started = time.process_time()
        feeds = [s.feed for s in seqs]
        hits = [self.prefixes.lookup(feed) for feed in feeds]
        rests = [feed[hit.length:] for feed, hit in zip(feeds, hits, strict=True)]
        cached = max(hit.length for hit in hits)
        longest = max(len(rest) for rest in rests)
        pad_id = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad_id] * (longest - len(rest)) + rest for rest in rests])
        mask = torch.tensor([[0] * (cached - hit.length) + [1] * hit.length
                             + [0] * (longest - len(rest)) + [1] * len(rest)
                             for hit, rest in zip(hits, rests, strict=True)])
        positions = torch.tensor([[0] * (longest - len(rest))
                                  + list(range(hit.length, hit.length + len(rest)))
                                  for hit, rest in zip(hits, rests, strict=True)])
        cache = self._prefix_cache(hits, cached)
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), cache=cache,
                         use_cache=True, logits_to_keep=1)
        self._charge(seqs, started)
        windows = cache.windows()
        for row, (seq, feed, hit, rest) in enumerate(zip(seqs, feeds, hits, rests, strict=True)):
            seq.cached = hit.length
            own = cached + longest - len(rest)
            self.prefixes.store(feed, hit, [(k[row:row + 1, :, own:], v[row:row + 1, :, own:])
                                                      for k, v in windows])
        part = _Batch(list(seqs), cache, mask)
        tokens = self._sample(out.logits[:, -1], seqs)
        finished = {i for i, (s, t) in enumerate(zip(seqs, tokens, strict=True))
                    if self._accept(s, t, events)}
        if len(finished) == len(seqs):
            return None
        part.keep([i for i in range(len(seqs)) if i not in finished])
        return part

    def _prefix_cache(self, hits: list[PrefixHit], cached: int) -> RowCache:
        """A cache for a prefill: empty, or the hits' prefixes right-aligned in ``cached``
        columns (zeros on the left)."""
        if cached == 0:
            return RowCache(self.layers, self.context)
        template = next(hit.layers for hit in hits if hit.layers is not None)
        layers: list[KV] = []
        for index, (keys, values) in enumerate(template):
            shape = (len(hits), keys.shape[1], cached, keys.shape[3])
            all_keys, all_values = keys.new_zeros(shape), values.new_zeros(shape)
            for row, hit in enumerate(hits):
                if hit.layers is not None:
                    all_keys[row, :, cached - hit.length:] = hit.layers[index][0][0]
                    all_values[row, :, cached - hit.length:] = hit.layers[index][1][0]
            layers.append((all_keys, all_values))
        return RowCache.wrap(layers, self.context)

    def _prefill_chunk(self, seq: Sequence, events: list[dict[str, Any]]) -> _Batch | None:
        """Feed the next ``max_prefill_tokens`` of a long prompt; after the last chunk,
        sample its first token and return it as a part to merge (None if it finished)."""
        started = time.process_time()
        if seq.partial is None:
            seq.partial = RowCache(self.layers, self.context)
        feed = seq.feed
        end = min(len(feed), seq.prefilled + self.max_prefill_tokens)
        ids = torch.tensor([feed[seq.prefilled:end]], device=self.device)
        positions = torch.arange(seq.prefilled, end, device=self.device).unsqueeze(0)
        out = self.model(input_ids=ids, attention_mask=torch.ones(1, end, dtype=torch.long,
                                                                  device=self.device),
                         position_ids=positions, cache=seq.partial, use_cache=True,
                         logits_to_keep=1)
        seq.prefilled = end
        self._charge([seq], started)
        if end < len(feed):
            return None
        cache, seq.partial = seq.partial, None
        if self._accept(seq, self._sample(out.logits[:, -1], [seq])[0], events):
            return None
        return _Batch([seq], cache, torch.ones(1, end, dtype=torch.long))

    def _decode(self, events: list[dict[str, Any]]) -> None:
        started = time.process_time()
        batch = self.batch
        ids = torch.tensor([[s.pending] for s in batch.seqs], device=self.device)
        positions = batch.mask.sum(1, keepdim=True)
        batch.mask = torch.cat([batch.mask, torch.ones(len(batch.seqs), 1, dtype=torch.long)], 1)
        out = self.model(input_ids=ids, attention_mask=batch.mask.to(self.device),
                         position_ids=positions.to(self.device), cache=batch.cache,
                         use_cache=True, logits_to_keep=1)
        self._charge(batch.seqs, started)
        tokens = self._sample(out.logits[:, -1], batch.seqs)
        done = {i for i, (s, t) in enumerate(zip(batch.seqs, tokens, strict=True))
                if self._accept(s, t, events)}
        self._drop_rows(done)

    # --- tokens -------------------------------------------------------------------------

    @staticmethod
    def _sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int | Exception]:
        """One token per row: argmax for greedy rows, nucleus sampling for the others; a row
        whose sampling fails gets the exception instead (it ends that sequence only)."""
        tokens: list[int | Exception] = list(logits.argmax(-1).tolist())
        for i, seq in enumerate(seqs):
            sampling = seq.sampling
            if sampling.temperature <= 0:
                continue
            try:
                probs = torch.softmax(logits[i].float() / sampling.temperature, -1)
                if sampling.top_p < 1.0:
                    sorted_probs, order = probs.sort(descending=True)
                    outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p
                    sorted_probs[outside] = 0.0
                    probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
                tokens[i] = int(torch.multinomial(probs, 1, generator=seq.generator))
            except Exception as exc:
                tokens[i] = exc
        return tokens

    def _accept(self, seq: Sequence, token: int | Exception, events: list[dict[str, Any]]) -> bool:
        """Record a sampled token and emit its text; True when ``seq`` has finished (also
        when handling it failed: it then ends with an ``error`` event)."""
        try:
            if isinstance(token, Exception):
                raise token
            return self._take(seq, token, events)
        except Exception as exc:
            log.exception("generation %d failed", seq.id)
            events.append(self._error(seq, exc))
            return True

    def _take(self, seq: Sequence, token: int, events: list[dict[str, Any]]) -> bool:
        if seq.first_token_at is None:
            seq.first_token_at = time.monotonic()
        if token in self.eos and not seq.sampling.ignore_eos:
            events.append(self._finish(seq, FinishReason.STOP))
            return True
        seq.generated.append(token)
        text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        for stop in seq.sampling.stop:
            at = text.find(stop, max(0, seq.sent - len(stop)))
            if at >= 0:
                events.append(self._finish(seq, FinishReason.STOP, text[:at]))
                return True
        if len(seq.generated) >= seq.sampling.max_tokens:
            events.append(self._finish(seq, FinishReason.LENGTH, text))
            return True
        ready = len(text) - _held_back(text, seq.sampling.stop)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character
            ready = min(ready, len(text.rstrip("\ufffd")))
        delta = text[seq.sent:ready] if ready > seq.sent else ""
        seq.sent = max(seq.sent, ready)
        events.append({"id": seq.id, "text": delta, "tokens": 1, "token": token})
        seq.pending = token
        return False

    def _finish(self, seq: Sequence, reason: str, text: str | None = None) -> dict[str, Any]:
        if text is None:
            text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        ttft = None if seq.first_token_at is None else seq.first_token_at - seq.started
        return {"id": seq.id, "finish": reason, "text": text, "delta": text[seq.sent:],
                "prompt_tokens": len(seq.prompt_ids), "completion_tokens": len(seq.generated),
                "cached_tokens": seq.cached,
                "preemptions": seq.preemptions, "cpu_seconds": seq.cpu_seconds,
                "time_to_first_token": ttft,
                "sampling": {"temperature": seq.sampling.temperature,
                             "top_p": seq.sampling.top_p}}

    @staticmethod
    def _charge(seqs: list[Sequence], started: float) -> None:
        share = (time.process_time() - started) / max(1, len(seqs))
        for seq in seqs:
            seq.cpu_seconds += share

    # --- the batch's cache ----------------------------------------------------------------

    def _merge(self, parts: list[_Batch]) -> None:
        """Join ``parts`` to the running batch, left-padding every row to one length."""
        batch = self.batch
        batch.cache.extend([p.cache for p in parts])
        length = batch.cache.length
        batch.mask = torch.cat([_left_pad_mask(p.mask, length) for p in [batch, *parts]])
        batch.seqs += [s for p in parts for s in p.seqs]

    def _drop_rows(self, rows: set[int]) -> None:
        if rows:
            self.batch.keep([i for i in range(len(self.batch.seqs)) if i not in rows])


def _left_pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    missing = length - mask.shape[1]
    return mask if missing == 0 else torch.cat([mask.new_zeros(mask.shape[0], missing), mask], 1)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` that may be the start of a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest
