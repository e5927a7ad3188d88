"""Automatic prefix caching: the KV of prompt prefixes that many requests share.

Chat requests to one model usually begin alike (the chat template, a system prompt), and
that beginning's keys and values are the same for every request: they depend only on the
tokens before them and their positions, which a shared prefix fixes. :class:`PrefixCache`
keeps them in blocks of :data:`BLOCK` tokens, keyed exactly by the block's tokens and the
block before it (a chain, as vLLM's automatic prefix caching does), so a new prompt's
prefill can start after its longest cached prefix instead of at token 0.

Contract:

* :meth:`PrefixCache.lookup` returns the longest run of cached whole blocks at the start of
  a prompt, always leaving at least one token of the prompt to run (its logits give the
  first new token); the blocks' tensors are shared, never written;
* :meth:`PrefixCache.store` adds the prompt's whole blocks after that prefix (copies);
* blocks are evicted least recently used first, children before their parents, once the
  cache holds more than ``max_bytes``; ``max_bytes`` 0 disables the cache.

Keys are exact token tuples, so a hit is never a hash collision. The cache is shared by
every client of the model: like any shared cache it tells a client, by its speed, whether
someone sent the same prefix recently (docs/security.md).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .kvcache import KV

#: Tokens per cached block: prefixes are reused a whole number of blocks at a time.
BLOCK = 16
#: What one loaded model may keep by default (SmolLM2-135M: ~0.7 MiB a block).
DEFAULT_MAX_BYTES = 64 * 2**20

_ids = itertools.count(1)
#: A block's key: the id of the block before it (0 at the start) and its tokens.
_Key = tuple[int, tuple[int, ...]]


@dataclass(slots=True)
class _Block:
    """``BLOCK`` tokens' per-layer keys and values, each ``(1, kv heads, BLOCK, head dim)``."""

    id: int
    layers: list[KV]
    nbytes: int


@dataclass(slots=True)
class PrefixHit:
    """The cached start of one prompt: ``length`` tokens (0 for none), the id of its last
    block (0 for none), the blocks' keys in the cache and, when ``length`` > 0, per layer
    the prefix's keys and values."""

    length: int = 0
    parent: int = 0
    path: list[_Key] = field(default_factory=list)
    layers: list[KV] | None = None


class PrefixCache:
    """Prompt-prefix blocks, least recently used evicted first (see the module contract)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._blocks: OrderedDict[_Key, _Block] = OrderedDict()
        #: Prompt tokens served from the cache, and prompt tokens looked up, since the start.
        self.hit_tokens = 0
        self.looked_up_tokens = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup(self, ids: list[int]) -> PrefixHit:
        """The longest cached prefix of ``ids`` (whole blocks, at least one token left)."""
        if self.max_bytes <= 0:
            return PrefixHit()
        self.looked_up_tokens += len(ids)
        path: list[tuple[_Key, _Block]] = []
        parent = 0
        for start in range(0, len(ids) - BLOCK, BLOCK):
            key = (parent, tuple(ids[start:start + BLOCK]))
            block = self._blocks.get(key)
            if block is None:
                break
            path.append((key, block))
            parent = block.id
        if not path:
            return PrefixHit()
        self._touch([key for key, _ in path])
        blocks = [block for _, block in path]
        layers = [(torch.cat([b.layers[i][0] for b in blocks], 2),
                   torch.cat([b.layers[i][1] for b in blocks], 2))
                  for i in range(len(blocks[0].layers))]
        length = BLOCK * len(blocks)
        self.hit_tokens += length
        return PrefixHit(length, parent, [key for key, _ in path], layers)

    def store(self, ids: list[int], hit: PrefixHit, layers: list[KV]) -> None:
        """Keep the whole blocks of ``ids`` after ``hit``; ``layers`` holds, per layer, the
        keys and values of ``ids[hit.length:]`` (``(1, kv heads, tokens, head dim)``)."""
        if self.max_bytes <= 0:
            return
        path = list(hit.path)
        parent = hit.parent
        for start in range(hit.length, len(ids) - BLOCK + 1, BLOCK):
            key = (parent, tuple(ids[start:start + BLOCK]))
            block = self._blocks.get(key)
            if block is None:
                at = start - hit.length
                kv = [(k[:, :, at:at + BLOCK].clone(), v[:, :, at:at + BLOCK].clone())
                      for k, v in layers]
                block = _Block(next(_ids), kv, sum(k.nbytes + v.nbytes for k, v in kv))
                self._blocks[key] = block
                self.nbytes += block.nbytes
            path.append(key)
            parent = block.id
        self._touch(path)
        self._evict()

    def _touch(self, path: list[_Key]) -> None:
        """Mark a chain used, its first block most recently: children go before parents."""
        for key in reversed(path):
            if key in self._blocks:  # a block of the hit may be gone since the lookup
                self._blocks.move_to_end(key)

    def _evict(self) -> None:
        while self.nbytes > self.max_bytes and self._blocks:
            _, block = self._blocks.popitem(last=False)
            self.nbytes -= block.nbytes
