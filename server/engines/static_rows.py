"""The transformers engine's KV cache on CUDA: `StaticRows`, preallocated buffers with a row
per running sequence and a column per position, so that a decode step has fixed shapes and
addresses and runs as a CUDA graph: one per (batch size, window), captured on first use,
those of the first window for every batch size when the engine loads (`prepare`).

Layout, as in `kv_cache.PaddedRows`: rows are left-padded, and every row writes its next
token into the same column, `next_column`. A step attends to the first `window` columns (a
power of two, at least MIN_WINDOW) through an additive mask; rows are padded to a
power of two (`batch_bucket`). The buffers start at `initial_columns` and grow to the
largest window used, and every graph is dropped when they do (a graph holds their addresses).

Rules: a graph's output is read before any other graph runs (they share one memory pool);
weights may change only in place (`copy_`), which keeps the graphs valid.
"""

from __future__ import annotations

import logging

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from server.engines.kv_cache import forward, has_plain_layers

log = logging.getLogger(__name__)

MIN_WINDOW = 256
INITIAL_COLUMNS = 1024  # the buffers' first size: growing them drops every graph, so start past most answers
GRAPH_WARMUP_RUNS = 2  # eager runs on a side stream before a capture, as torch advises


def batch_bucket(num_rows: int, max_rows: int) -> int:
    """The batch size a step runs at: the next power of two, at most `max_rows`."""
    return min(max_rows, 1 << (num_rows - 1).bit_length())


def window_for(num_columns: int) -> int:
    """The columns a step attends to when `num_columns` are in use: the next power of two, at least MIN_WINDOW."""
    return max(MIN_WINDOW, 1 << (num_columns - 1).bit_length())


def columns_to_drop(first_used: int, next_column: int) -> int:
    """How many leading columns to shift out before a step writes `next_column`: those no
    row uses, when dropping them shrinks the window (and so each step's attention)."""
    if first_used and window_for(next_column + 1 - first_used) < window_for(next_column + 1):
        return first_used
    return 0


def initial_columns(max_model_len: int) -> int:
    """The columns allocated when the engine loads: INITIAL_COLUMNS, or fewer for a short context."""
    return min(INITIAL_COLUMNS, window_for(max_model_len))


def static_cache_bytes(config: dict, max_rows: int, max_model_len: int, dtype_bytes: int) -> int:
    """What the static cache holds once loaded (for the memory budget): keys and values of
    every layer for `max_rows` rows and `initial_columns` columns. 0 where `config` (a
    config.json) does not say its attention's shape."""
    layers, heads, hidden = (config.get(key) for key in ("num_hidden_layers", "num_attention_heads", "hidden_size"))
    if not (layers and heads and hidden):
        return 0
    kv_heads, head_dim = config.get("num_key_value_heads") or heads, config.get("head_dim") or hidden // heads
    return 2 * layers * kv_heads * head_dim * max_rows * initial_columns(max_model_len) * dtype_bytes


def can_use_static_rows(model) -> bool:
    """Plain attention layers that take a prepared 4-D mask (sdpa or eager attention)."""
    plain = has_plain_layers(DynamicCache(config=model.config))
    return plain and model.config._attn_implementation in ("sdpa", "eager")


class StaticRows:
    can_join_running = True

    def __init__(self, model, max_rows: int, use_graphs: bool, first_columns: int = MIN_WINDOW):
        self._model = model
        self._max_rows = max_rows
        self._first_columns = first_columns  # what `prepare` allocates
        self._use_graphs = use_graphs
        device = model.device
        self._input_ids = torch.zeros((max_rows, 1), dtype=torch.long, device=device)
        self._positions = torch.zeros((max_rows, 1), dtype=torch.long, device=device)
        self._column = torch.zeros(1, dtype=torch.long, device=device)
        self._keys: list[torch.Tensor] = []  # per layer: (max_rows, kv heads, capacity, head dim)
        self._values: list[torch.Tensor] = []
        self._mask: torch.Tensor | None = None  # (max_rows, capacity): 0 attends, `_masked` does not
        self._masked = torch.finfo(model.dtype).min  # not -inf: a row masked whole stays finite
        self._starts: list[int] = []  # per running row: its first column in use
        self.next_column = 0
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_pool = None

    @property
    def capacity(self) -> int:
        return 0 if self._mask is None else self._mask.shape[-1]

    def join(self, cache: DynamicCache, attention_mask: torch.Tensor) -> None:
        num_running, (num_joining, length) = len(self._starts), attention_mask.shape
        if num_running + num_joining > self._max_rows:
            raise ValueError(f"{num_running + num_joining} rows do not fit in {self._max_rows}")
        if not num_running:
            self.next_column = 0
        if not self._keys:
            self._allocate(cache, window_for(length + 1))
        if length > self.next_column:
            self._shift(0, length - self.next_column)
        self._grow_to(window_for(self.next_column + 1))
        rows, columns = slice(num_running, num_running + num_joining), slice(self.next_column - length, self.next_column)
        for keys, values, layer in zip(self._keys, self._values, cache.layers, strict=True):
            keys[rows, :, columns] = layer.keys
            values[rows, :, columns] = layer.values
        self._mask[rows] = self._masked
        self._mask[rows, columns] = torch.where(attention_mask.bool(), 0.0, self._masked).to(self._mask.dtype)
        lengths = attention_mask.sum(-1)
        self._positions[rows, 0] = lengths
        self._starts += [self.next_column - int(n) for n in lengths.tolist()]

    def decode(self, token_ids: list[int]) -> torch.Tensor:
        num_rows = len(token_ids)
        if drop := columns_to_drop(min(self._starts), self.next_column):
            self._shift(drop, -drop)
        window = window_for(self.next_column + 1)
        self._grow_to(window)
        self._input_ids[:num_rows, 0] = torch.tensor(token_ids).to(self._input_ids.device)
        self._mask[:num_rows, self.next_column] = 0
        self._column.fill_(self.next_column)
        logits = self._run(batch_bucket(num_rows, self._max_rows), window)[:num_rows]
        self._positions[:num_rows] += 1
        self.next_column += 1
        return logits

    def keep(self, rows: list[int]) -> None:
        moves = [(to, source) for to, source in enumerate(rows) if to != source]
        if moves:
            to, source = (torch.tensor(side, device=self._input_ids.device) for side in zip(*moves))
            used = slice(0, self.next_column)
            for buffer in (*self._keys, *self._values):
                buffer[to, :, used] = buffer[source, :, used]
            self._mask[to] = self._mask[source]
            self._positions[to] = self._positions[source]
        self._starts = [self._starts[row] for row in rows]

    def row_kv(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the keys and values row `row` holds, (heads, tokens, dim), in order (views)."""
        columns = slice(self._starts[row], self.next_column)
        return [(keys[row, :, columns], values[row, :, columns]) for keys, values in zip(self._keys, self._values, strict=True)]

    def prepare(self, cache: DynamicCache) -> None:
        """Allocate the buffers (shaped as `cache`'s layers, a prefill's) and capture the
        first window's graph for every batch size, so that no request waits for a capture
        there. Only while no row runs: the captures write column 0 of idle rows."""
        if not self._keys:
            self._allocate(cache, self._first_columns)
        if self._use_graphs:
            self._column.fill_(0)
            for batch in sorted({batch_bucket(n, self._max_rows) for n in range(1, self._max_rows + 1)}):
                self._run(batch, MIN_WINDOW)

    def describe(self) -> str:
        steps = f"CUDA graphs ({len(self._graphs)} captured)" if self._use_graphs else "eager steps"
        return f"{steps}, static cache of {self.capacity} columns"

    # -- columns and buffers ------------------------------------------------------------

    def _shift(self, first: int, by: int) -> None:
        """Move the running rows' columns from `first` up to `next_column` by `by` (left if
        negative); columns left behind are masked."""
        num_rows, end = len(self._starts), self.next_column
        self._grow_to(window_for(end + by + 1))
        rows, source, target = slice(0, num_rows), slice(first, end), slice(first + by, end + by)
        for buffer in (*self._keys, *self._values):
            buffer[rows, :, target] = buffer[rows, :, source].clone()
        mask = self._mask[rows, source].clone()
        self._mask[rows, min(first, first + by) : max(end, end + by)] = self._masked
        self._mask[rows, target] = mask
        self._starts = [start + by for start in self._starts]
        self.next_column = end + by

    def _allocate(self, cache: DynamicCache, columns: int) -> None:
        def empty(layer_keys: torch.Tensor) -> torch.Tensor:
            _, heads, _, head_dim = layer_keys.shape
            return layer_keys.new_zeros((self._max_rows, heads, columns, head_dim))

        self._keys = [empty(layer.keys) for layer in cache.layers]
        self._values = [empty(layer.values) for layer in cache.layers]
        self._mask = torch.full((self._max_rows, columns), self._masked, dtype=self._model.dtype, device=self._input_ids.device)

    def _grow_to(self, columns: int) -> None:
        if columns <= self.capacity:
            return
        old = self.capacity
        self._keys = [_widened(buffer, columns, -2, 0.0) for buffer in self._keys]
        self._values = [_widened(buffer, columns, -2, 0.0) for buffer in self._values]
        self._mask = _widened(self._mask, columns, -1, self._masked)
        self._graphs.clear()
        self._graph_pool = None  # a pool whose graphs are all gone is released: capturing into it again fails
        log.debug("static KV cache grown from %d to %d columns", old, columns)

    # -- steps ------------------------------------------------------------------------

    def _run(self, batch: int, window: int) -> torch.Tensor:
        if not self._use_graphs:
            return self._step(batch, window)()
        if (batch, window) not in self._graphs:
            try:
                self._graphs[batch, window] = self._capture(batch, window)
            except Exception as error:  # a model that syncs with the host cannot be captured
                log.warning("decode steps run eagerly: capturing a CUDA graph failed: %s", error)
                self._use_graphs = False
                return self._step(batch, window)()
        graph, output = self._graphs[batch, window]
        graph.replay()
        return output

    def _step(self, batch: int, window: int):
        """The forward pass of one decode step over `batch` rows and `window` columns."""
        cache = DynamicCache(config=self._model.config)
        cache.layers = [
            _ColumnWriter(keys[:batch, :, :window], values[:batch, :, :window], self._column)
            for keys, values in zip(self._keys, self._values, strict=True)
        ]
        mask, input_ids, positions = self._mask[:batch, None, None, :window], self._input_ids[:batch], self._positions[:batch]
        return lambda: forward(self._model, input_ids, mask, positions, cache)

    def _capture(self, batch: int, window: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        step = self._step(batch, window)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP_RUNS):
                step()  # writes this step's column with this step's inputs: harmless
        torch.cuda.current_stream().wait_stream(side)
        self._graph_pool = self._graph_pool or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):  # other threads may use CUDA
            output = step()
        log.debug("captured a decode step: %d rows, %d columns", batch, window)
        return graph, output


class _ColumnWriter(DynamicLayer):
    """A cache layer over views of the static buffers: an update writes its key and value
    into column `column` (a tensor, so that a replayed graph writes where it says now)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, column: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.is_initialized = keys, values, True
        self._column = column

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys.index_copy_(2, self._column, key_states)
        self.values.index_copy_(2, self._column, value_states)
        return self.keys, self.values


def _widened(buffer: torch.Tensor, columns: int, dim: int, fill: float) -> torch.Tensor:
    """`buffer` with `columns` columns (its dimension `dim`), the new ones set to `fill`."""
    shape = list(buffer.shape)
    shape[dim] = columns
    wide = torch.full(shape, fill, dtype=buffer.dtype, device=buffer.device)
    wide.narrow(dim, 0, buffer.shape[dim]).copy_(buffer)
    return wide
