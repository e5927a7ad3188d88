"""RowCache against a plain reference: each row's own keys/values, left-padded with zeros."""

from __future__ import annotations

import torch

from llmos.drivers.kvcache import RowCache

#: The longest window (a model's context); buffers never grow past it.
LIMIT = 200


def states(rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rows, 2, length, 4), torch.randn(rows, 2, length, 4)


def expected(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (each (kv heads, own length, head dim)) left-padded to the longest, stacked."""
    length = max(keys.shape[1] for keys, _ in rows)

    def pad(tensor: torch.Tensor) -> torch.Tensor:
        zeros = tensor.new_zeros(tensor.shape[0], length - tensor.shape[1], tensor.shape[2])
        return torch.cat([zeros, tensor], 1)

    return (torch.stack([pad(k) for k, _ in rows]), torch.stack([pad(v) for _, v in rows]))


def check(cache: RowCache, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    want_keys, want_values = expected(rows)
    for keys, values in cache.windows():
        assert torch.equal(keys, want_keys) and torch.equal(values, want_values)


def step(cache: RowCache, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """One decode step: a new column for every row, through every layer."""
    keys, values = states(len(rows), 1)
    for index in range(len(cache.layers)):
        cache.update(keys, values, index)
    rows[:] = [(torch.cat([k, keys[i]], 1), torch.cat([v, values[i]], 1))
               for i, (k, v) in enumerate(rows)]


def part(length: int, count: int = 1) -> tuple[RowCache, list[tuple[torch.Tensor, torch.Tensor]]]:
    keys, values = states(count, length)
    cache = RowCache.wrap([(keys, values), (keys.clone(), values.clone())], LIMIT)
    return cache, [(keys[i], values[i]) for i in range(count)]


def test_rows_join_decode_across_growth_leave_and_rejoin():
    torch.manual_seed(0)
    cache, rows = RowCache(2, LIMIT), []
    first, first_rows = part(3, count=2)
    cache.extend([first])
    rows += first_rows
    check(cache, rows)
    capacity = cache.layers[0].keys.shape[2]
    for _ in range(3 * capacity):  # several geometric growths
        step(cache, rows)
        check(cache, rows)
    assert cache.layers[0].keys.shape[2] >= 4 * capacity
    longer, longer_rows = part(cache.length + 5)  # more padding for the others: reallocated
    cache.extend([longer])
    rows += longer_rows
    check(cache, rows)
    step(cache, rows)
    keep = [2, 0]  # the longest row and the first, reordered
    cache.keep(keep, 0)
    rows = [rows[i] for i in keep]
    check(cache, rows)
    cache.keep([1], cache.length - rows[1][0].shape[1])  # only the shorter one: trimmed
    rows = [rows[1]]
    check(cache, rows)
    shorter, shorter_rows = part(2)
    again, again_rows = part(cache.length + 2)  # needs 2 columns left of the window: in place
    buffer = cache.layers[0].keys
    cache.extend([shorter, again])
    assert cache.layers[0].keys is buffer
    rows += shorter_rows + again_rows
    check(cache, rows)
    step(cache, rows)
    check(cache, rows)


def test_a_row_is_copied_out_and_wrapped_back():
    torch.manual_seed(1)
    cache, rows = RowCache(2, LIMIT), []
    both, both_rows = part(4, count=1)
    other, other_rows = part(7, count=1)
    cache.extend([both, other])
    rows += both_rows + other_rows
    step(cache, rows)
    saved = cache.row(0, skip=3)  # its 3 padding columns stay behind
    cache.keep([1], 0)
    back = RowCache.wrap(saved, LIMIT)
    check(back, rows[:1])
    cache.extend([back])
    check(cache, [rows[1], rows[0]])


def test_emptied_cache_frees_its_buffers_and_takes_new_rows():
    torch.manual_seed(2)
    cache, rows = RowCache(2, LIMIT), []
    first, rows = part(5)
    cache.extend([first])
    step(cache, rows)
    cache.keep([], cache.length)
    assert cache.rows == 0 and cache.length == 0 and cache.layers[0].keys is None
    second, rows = part(3)
    cache.extend([second])
    check(cache, rows)


def test_buffers_stop_growing_at_the_limit():
    torch.manual_seed(3)
    cache, rows = RowCache(2, LIMIT), []
    first, rows = part(LIMIT - 10)
    cache.extend([first])
    assert cache.layers[0].keys.shape[2] == LIMIT
    for _ in range(10):
        step(cache, rows)
    check(cache, rows)
    assert cache.layers[0].keys.shape[2] == LIMIT
