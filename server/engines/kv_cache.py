"""The transformers engine's KV cache where shapes may change every step (CPU, and CUDA
without graphs): `PaddedRows`, transformers' `DynamicCache` with a row per running sequence,
left-padded to one length, whose plain layers keep spare columns. A decode step writes its
one new column in place, where `DynamicLayer` copies the layer's whole cache to append it
(every step, every layer: at batch 8 and 500 tokens of SmolLM2-135M in float32, 120 MB a step).

A row cache (this one, or `static_rows.StaticRows` on CUDA) is driven by `ContinuousBatch`
on the engine's worker thread: `join` the prefilled rows of new sequences, `decode` one
token for every row, `keep` the rows still running (in order).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from server.engines.row_attention import attends_per_row

MIN_SPARE_COLUMNS = 64


class PaddedRows:
    def __init__(self, model, per_row: bool = False):
        """`per_row`: the model attends through row_attention.py's ROW_ATTENTION, so a step
        whose padding would dominate attends row by row."""
        self._model = model
        self._per_row = per_row
        self._cache: DynamicCache | None = None
        self._attention_mask: torch.Tensor | None = None  # (rows, cached length)
        self.can_join_running = has_plain_layers(DynamicCache(config=model.config))
        self.num_row_steps = 0  # steps that attended row by row

    def join(self, cache: DynamicCache, attention_mask: torch.Tensor) -> None:
        """Add the prefilled rows of `cache` (their mask: `attention_mask`) after the running ones."""
        if self._cache is None:
            self._cache, self._attention_mask = cache, attention_mask
            return
        length = max(self._attention_mask.shape[-1], attention_mask.shape[-1])
        self._attention_mask = torch.cat([pad_left(self._attention_mask, length), pad_left(attention_mask, length)], dim=0)
        for running, joining in zip(self._cache.layers, cache.layers, strict=True):
            running.keys = torch.cat([pad_left(running.keys, length, -2), pad_left(joining.keys, length, -2)])
            running.values = torch.cat([pad_left(running.values, length, -2), pad_left(joining.values, length, -2)])

    def decode(self, token_ids: list[int]) -> torch.Tensor:
        """The next-token logits of every row, each fed its `token_ids` entry."""
        device = self._attention_mask.device
        input_ids = torch.tensor([[token_id] for token_id in token_ids], device=device)
        ones = torch.ones((len(token_ids), 1), dtype=self._attention_mask.dtype, device=device)
        self._attention_mask = torch.cat([self._attention_mask, ones], dim=-1)
        lengths = self._attention_mask.sum(-1, keepdim=True)
        return forward(self._model, input_ids, self._attention_mask, lengths - 1, self._cache, **self._row_starts(lengths))

    def _row_starts(self, lengths: torch.Tensor) -> dict:
        """`row_starts` for the model, where this step attends row by row (rows are left-padded).
        Rule: without row attention a step reads nothing back from its tensors here."""
        if not self._per_row:
            return {}
        num_columns, lengths = self._attention_mask.shape[-1], lengths.flatten().tolist()
        if not attends_per_row(lengths, num_columns):
            return {}
        self.num_row_steps += 1
        return {"row_starts": [num_columns - length for length in lengths]}

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (ascending indices), in that order."""
        if not rows:
            self._cache, self._attention_mask = None, None
            return
        selected = torch.tensor(rows, device=self._attention_mask.device)
        for layer in self._cache.layers:
            layer.batch_select_indices(selected)
        self._attention_mask = self._attention_mask[selected]
        self._trim_padding()

    def row_kv(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the keys and values row `row` holds, (heads, tokens, dim), in order (views)."""
        start = int(self._attention_mask[row].argmax())  # its first column that is not padding
        return [(layer.keys[row, :, start:], layer.values[row, :, start:]) for layer in self._cache.layers]

    def prepare(self, cache: DynamicCache) -> None:
        """Nothing to set up: the cache is made per batch."""

    def describe(self) -> str:
        return "eager steps, padded cache" + (f", {self.num_row_steps} steps attended row by row" if self._per_row else "")

    def _trim_padding(self) -> None:
        """Drop leading cache columns that are padding in every remaining row."""
        if not self.can_join_running:
            return
        num_unused = int(self._attention_mask.any(dim=0).int().argmax())
        if num_unused:
            self._attention_mask = self._attention_mask[:, num_unused:]
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, num_unused:], layer.values[:, :, num_unused:]


def forward(model, input_ids, attention_mask, position_ids, cache, **attention) -> torch.Tensor:
    """The logits of each row's last position; `attention`: what the model's attention takes beside."""
    return forward_positions(model, input_ids, attention_mask, position_ids, cache, logits_to_keep=1, **attention)[:, -1, :]


@torch.inference_mode()
def forward_positions(model, input_ids, attention_mask, position_ids, cache, logits_to_keep: int = 0, **attention) -> torch.Tensor:
    """The logits of each row's last `logits_to_keep` positions (0: every position), as
    (rows, positions, vocabulary)."""
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=logits_to_keep,
        **attention,
    )
    return output.logits


def left_padded(prompts, pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as one batch, each right-aligned (its last token in the last column): input ids
    and the attention mask that hides the padding."""
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt) :] = torch.tensor(list(prompt))
        attention_mask[row, length - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's position in its own prompt (padding counts as 0)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def pad_left(tensor: torch.Tensor, length: int, dim: int = -1) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def has_plain_layers(cache: DynamicCache) -> bool:
    """Rows can be joined only where every cache layer is a plain, unbounded one."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


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
