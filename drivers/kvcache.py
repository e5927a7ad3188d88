"""A preallocated, left-padded KV cache for a batch of rows that join and leave.

:class:`RowCache` is a transformers :class:`~transformers.Cache` whose layers keep their keys
and values in buffers of shape ``(row capacity, kv heads, column capacity, head dim)``. The
rows in use are ``0 .. rows-1``; the columns in use are the window ``start .. end``, shared by
every row and every layer, with each row's own tokens right-aligned in it (left padding,
masked out by the caller's attention mask, is zeros). A forward pass writes its new keys and
values in place at column ``end`` and attends over the window only (views, no copy), so a
decode step costs no concatenation of the whole cache as :class:`~transformers.DynamicCache`
does. Buffers grow geometrically (up to the model's context) when the window reaches the
end of the columns, and are reallocated when rows join that do not fit; both copy the
window once, to column 0. They are freed when the last row leaves.

Rows leave with :meth:`RowCache.keep` (the kept rows move to the front, leading padding shared
by all of them is skipped), join with :meth:`RowCache.extend` (other caches' windows are copied
in, right-aligned, with zeros for the extra padding), and a row's own tokens can be copied out
(:meth:`RowCache.row`) and wrapped back into a one-row cache (:meth:`RowCache.wrap`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

#: (keys, values) of one layer, each ``(rows, kv heads, length, head dim)``.
KV = tuple[torch.Tensor, torch.Tensor]


class _Layer(CacheLayerMixin):
    """One layer's buffers and window. ``keys``/``values`` are the whole buffers."""

    is_sliding = False
    is_croppable = False

    def __init__(self, max_length: int) -> None:
        super().__init__()
        self.max_length = max_length
        self.start = 0
        self.end = 0

    @property
    def length(self) -> int:
        return self.end - self.start

    def window(self, rows: int) -> KV:
        assert self.keys is not None and self.values is not None
        return (self.keys[:rows, :, self.start:self.end], self.values[:rows, :, self.start:self.end])

    def set(self, keys: torch.Tensor, values: torch.Tensor, start: int, end: int) -> None:
        self.keys, self.values, self.start, self.end = keys, values, start, end
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.set(key_states[:, :, :0], value_states[:, :, :0], 0, 0)

    def release(self) -> None:
        """Drop the buffers (no row is left)."""
        self.keys = self.values = None
        self.start = self.end = 0
        self.is_initialized = False

    def capacity(self, needed: int, wanted: int) -> int:
        """Columns for a new buffer: ``wanted``, but at most ``max_length``, and at least
        ``needed``."""
        return max(needed, min(wanted, self.max_length))

    def reserve(self, rows: int, columns: int, wanted: int) -> None:
        """Make room for ``rows`` rows and ``columns`` columns after ``end``; a reallocation
        gives ``wanted`` columns if it can (see :meth:`capacity`) and moves the window to
        column 0."""
        assert self.keys is not None and self.values is not None
        if rows <= self.keys.shape[0] and self.end + columns <= self.keys.shape[2]:
            return
        rows_now = min(rows, self.keys.shape[0])
        length = self.length
        keys, values = self.window(rows_now)
        shape = (max(rows, self.keys.shape[0]), keys.shape[1],
                 self.capacity(length + columns, wanted), keys.shape[3])
        new_keys, new_values = keys.new_zeros(shape), values.new_zeros(shape)
        new_keys[:rows_now, :, :length] = keys
        new_values[:rows_now, :, :length] = values
        self.set(new_keys, new_values, 0, length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> KV:
        """Write the new states at column ``end`` (growing the buffers geometrically) and
        return the window including them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None
        rows, added = key_states.shape[0], key_states.shape[2]
        self.reserve(rows, added, 2 * self.keys.shape[2])
        self.keys[:rows, :, self.end:self.end + added] = key_states
        self.values[:rows, :, self.end:self.end + added] = value_states
        self.end += added
        return self.window(rows)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1


class RowCache(Cache):
    """The KV cache of ``rows`` left-padded rows (see the module docstring).

    Contract: every forward pass through it feeds all ``rows`` rows (or, while it is empty,
    sets ``rows`` to its batch size), with a 2-D attention mask of ``(rows, length + new)``.
    Buffers never get more than ``max_length`` columns unless the window needs them (give
    the model's context), and are freed when the last row leaves."""

    def __init__(self, num_layers: int, max_length: int) -> None:
        super().__init__(layers=[_Layer(max_length) for _ in range(num_layers)])
        self._rows = 0

    @property
    def _kv_layers(self) -> list[_Layer]:
        return self.layers  # type: ignore[return-value]

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def length(self) -> int:
        """Columns in use: the longest row's tokens plus the padding of the others."""
        return self._kv_layers[0].length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> KV:
        self._rows = key_states.shape[0]
        return self._kv_layers[layer_idx].update(key_states, value_states)

    def windows(self) -> list[KV]:
        """Per layer, the used rows and columns (views into the buffers)."""
        return [layer.window(self.rows) for layer in self._kv_layers]

    @classmethod
    def wrap(cls, layers: Sequence[KV], max_length: int) -> RowCache:
        """A cache holding these per-layer tensors as its buffers, without a copy."""
        cache = cls(len(layers), max_length)
        for layer, (keys, values) in zip(cache._kv_layers, layers, strict=True):
            layer.set(keys, values, 0, keys.shape[2])
        cache._rows = layers[0][0].shape[0]
        return cache

    def row(self, row: int, skip: int) -> list[KV]:
        """Copies of row ``row``'s cached tokens, without its first ``skip`` (padding) columns."""
        return [(k[row:row + 1, :, skip:].clone(), v[row:row + 1, :, skip:].clone())
                for k, v in self.windows()]

    def keep(self, rows: list[int], trim: int) -> None:
        """Keep only ``rows`` (in this order, moved to the front) and drop the first ``trim``
        columns of the window (padding for every kept row). Keeping none frees the buffers."""
        self._rows = len(rows)
        if not rows:
            for layer in self._kv_layers:
                layer.release()
            return
        moved = rows != list(range(len(rows)))
        index = torch.tensor(rows)
        for layer in self._kv_layers:
            if moved:
                assert layer.keys is not None and layer.values is not None
                window = slice(layer.start, layer.end)
                index = index.to(layer.keys.device)
                layer.keys[:len(rows), :, window] = layer.keys[index, :, window]
                layer.values[:len(rows), :, window] = layer.values[index, :, window]
            layer.start += trim

    def extend(self, others: Sequence[RowCache]) -> None:
        """Append the rows of ``others`` after this cache's rows, padding every row on the
        left to the longest window; reallocates (with room to double) only when needed."""
        old_rows = self._rows
        length = max(self.length, *(other.length for other in others))
        rows = old_rows + sum(other.rows for other in others)
        windows = [other.windows() for other in others]
        for index, layer in enumerate(self._kv_layers):
            parts = [per_layer[index] for per_layer in windows]
            if not layer.is_initialized:
                layer.lazy_initialization(*parts[0])
            self._grow_left(layer, old_rows, rows, length)
            assert layer.keys is not None and layer.values is not None
            first = old_rows
            for keys, values in parts:
                count, own = keys.shape[0], keys.shape[2]
                block = slice(first, first + count)
                layer.keys[block, :, layer.start:layer.end - own] = 0
                layer.values[block, :, layer.start:layer.end - own] = 0
                layer.keys[block, :, layer.end - own:layer.end] = keys
                layer.values[block, :, layer.end - own:layer.end] = values
                first += count
        self._rows = rows

    @staticmethod
    def _grow_left(layer: _Layer, old_rows: int, rows: int, length: int) -> None:
        """Widen ``layer``'s window to ``length`` columns by moving its start left (zeroing
        the new padding of the existing rows), reallocating if the buffers are too small."""
        assert layer.keys is not None and layer.values is not None
        extra = length - layer.length
        if rows > layer.keys.shape[0] or extra > layer.start:
            capacity = layer.capacity(length, max(2 * length, layer.keys.shape[2]))
            shape = (rows, layer.keys.shape[1], capacity, layer.keys.shape[3])
            keys, values = layer.keys.new_zeros(shape), layer.values.new_zeros(shape)
            old_keys, old_values = layer.window(old_rows)
            keys[:old_rows, :, extra:length] = old_keys
            values[:old_rows, :, extra:length] = old_values
            layer.set(keys, values, 0, length)
            return
        layer.keys[:old_rows, :, layer.start - extra:layer.start] = 0
        layer.values[:old_rows, :, layer.start - extra:layer.start] = 0
        layer.start -= extra
