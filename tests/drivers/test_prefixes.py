"""The prefix cache alone: exact block chains, at least one token left, LRU eviction that
drops children before their parents."""

from __future__ import annotations

import torch

from llmos.drivers.prefixes import BLOCK, PrefixCache, PrefixHit


def kv(tokens: int, value: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two layers of keys/values (1, 2 heads, tokens, 4), token t filled with value + t."""
    ramp = value + torch.arange(tokens, dtype=torch.float32).view(1, 1, tokens, 1)
    return [(ramp.expand(1, 2, tokens, 4).clone(), -ramp.expand(1, 2, tokens, 4).clone())
            for _ in range(2)]


def block_bytes() -> int:
    return sum(k.nbytes + v.nbytes for k, v in kv(BLOCK, 0.0))


def test_a_hit_returns_the_stored_tensors_of_whole_blocks_only():
    cache = PrefixCache()
    ids = list(range(100, 100 + 2 * BLOCK + 5))
    cache.store(ids, PrefixHit(), kv(len(ids), 0.0))
    assert len(cache) == 2
    hit = cache.lookup(ids[:2 * BLOCK] + [7, 8])
    assert hit.length == 2 * BLOCK and hit.layers is not None
    assert torch.equal(hit.layers[1][0], kv(2 * BLOCK, 0.0)[1][0])
    assert cache.lookup(ids[:2 * BLOCK]).length == BLOCK  # one token must be left to run
    assert cache.lookup([1] + ids[1:]).length == 0  # exact tokens, from the start
    assert cache.lookup(ids[:BLOCK] + [5] * BLOCK + [6]).length == BLOCK  # a chain, not a set


def test_storing_after_a_hit_extends_the_chain():
    cache = PrefixCache()
    first = list(range(2 * BLOCK))
    cache.store(first, PrefixHit(), kv(len(first), 0.0))
    longer = first + list(range(500, 500 + BLOCK + 1))
    hit = cache.lookup(longer)
    assert hit.length == 2 * BLOCK
    cache.store(longer, hit, kv(len(longer) - hit.length, 50.0))
    again = cache.lookup(longer)
    assert again.length == 3 * BLOCK and again.layers is not None
    assert float(again.layers[0][0][0, 0, 2 * BLOCK, 0]) == 50.0  # the new block's first token


def test_eviction_drops_the_least_recent_chain_children_first():
    cache = PrefixCache(max_bytes=3 * block_bytes())
    a = list(range(2 * BLOCK + 1))
    b = list(range(1000, 1000 + BLOCK + 1))
    cache.store(a, PrefixHit(), kv(len(a), 0.0))
    cache.store(b, PrefixHit(), kv(len(b), 0.0))
    assert len(cache) == 3
    cache.lookup(b)  # b is now the most recent
    c = list(range(2000, 2000 + BLOCK + 1))
    cache.store(c, PrefixHit(), kv(len(c), 0.0))  # one block must go: a's second
    assert len(cache) == 3 and cache.nbytes == 3 * block_bytes()
    assert cache.lookup(a).length == BLOCK
    assert cache.lookup(b).length == BLOCK and cache.lookup(c).length == BLOCK
