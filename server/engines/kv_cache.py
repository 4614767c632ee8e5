"""The transformers engine's KV cache: transformers' `DynamicCache`, whose plain layers keep
spare columns. A decode step writes its one new column in place, where `DynamicLayer`
copies the layer's whole cache to append it (every step, every layer: at batch 8 and 500
tokens of SmolLM2-135M in float32, 120 MB a step).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_SPARE_COLUMNS = 64


class SpareColumnsLayer(DynamicLayer):
    """`keys` and `values` are views of the first columns of larger buffers.

    Rule: code that replaces `keys`/`values` (rows cut or joined, padding trimmed) leaves
    tensors that are not those views; the next update sees it and copies them into fresh
    buffers, so a view and its buffer never disagree."""

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        used = self.get_seq_length()
        total = used + key_states.shape[-2]
        if not self._views_own_buffers(key_states) or total > self._key_buffer.shape[-2]:
            self._key_buffer, self._value_buffer = _grown(self.keys, key_states, total), _grown(self.values, value_states, total)
        self._key_buffer[..., used:total, :] = key_states
        self._value_buffer[..., used:total, :] = value_states
        self.keys, self.values = self._key_buffer[..., :total, :], self._value_buffer[..., :total, :]
        return self.keys, self.values

    @property
    def capacity(self) -> int:
        return 0 if self._key_buffer is None else self._key_buffer.shape[-2]

    def _views_own_buffers(self, key_states: torch.Tensor) -> bool:
        buffer = self._key_buffer
        if buffer is None or buffer.shape[:-2] != key_states.shape[:-2]:
            return False
        return self.get_seq_length() == 0 or (self.keys.data_ptr() == buffer.data_ptr() and self.values.data_ptr() == self._value_buffer.data_ptr())


def _grown(kept: torch.Tensor, new: torch.Tensor, total: int) -> torch.Tensor:
    """A buffer for `total` columns and half as many again (at least MIN_SPARE_COLUMNS),
    holding `kept` (which may be empty) in its first columns."""
    shape = (*new.shape[:-2], total + max(MIN_SPARE_COLUMNS, total // 2), new.shape[-1])
    buffer = torch.empty(shape, dtype=new.dtype, device=new.device)
    if kept.numel():
        buffer[..., : kept.shape[-2], :] = kept
    return buffer


def new_cache(config) -> DynamicCache:
    """A DynamicCache for `config`, its plain layers keeping spare columns (sliding-window
    and other special layers stay transformers' own)."""
    cache = DynamicCache(config=config)
    cache.layers = [SpareColumnsLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
