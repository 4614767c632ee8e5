"""The static row cache (CUDA's, run eagerly here): the same logits as the padded dynamic one
through joins, decode steps, departures, windows that grow and columns shifted out; and
its pure rules (batch buckets, windows, when to drop columns)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.engines.factory import LOAD_OVERHEAD, estimate_memory_bytes
from server.engines.kv_cache import PaddedRows, forward, new_cache
from server.engines.static_rows import MIN_WINDOW, StaticRows, batch_bucket, can_use_static_rows, columns_to_drop, initial_columns, static_cache_bytes, window_for


def test_batch_buckets_are_powers_of_two_up_to_the_row_limit():
    assert [batch_bucket(n, 12) for n in (1, 2, 3, 5, 8, 9, 12)] == [1, 2, 4, 8, 8, 12, 12]


def test_windows_are_powers_of_two_of_at_least_the_minimum():
    assert window_for(1) == window_for(MIN_WINDOW) == MIN_WINDOW
    assert window_for(MIN_WINDOW + 1) == 2 * MIN_WINDOW
    assert window_for(5000) == 8192


def test_the_first_buffers_hold_most_answers_or_the_whole_context():
    assert initial_columns(8192) == 1024 and initial_columns(300) == 512 and initial_columns(100) == MIN_WINDOW


def test_the_memory_budget_counts_the_static_cache_where_graphs_will_run(tiny_model_path):
    smol = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}
    assert static_cache_bytes(smol, max_rows=16, max_model_len=8192, dtype_bytes=2) == 2 * 30 * 3 * 64 * 16 * 1024 * 2  # 360 MiB
    assert static_cache_bytes({"model_type": "unknown"}, 16, 8192, 2) == 0
    stored, tiny_cache = 1000, 2 * 2 * 2 * 16 * 16 * 1024 * 4  # 2 layers, 2 of 4 heads kept, head 16, float32
    without_prefixes = {"engine": "transformers", "prefix_cache_mib": 0}
    on_cuda = estimate_memory_bytes(tiny_model_path, {**without_prefixes, "device": "cuda"}, stored)
    assert on_cuda == int(stored * LOAD_OVERHEAD) + tiny_cache
    for off in ({"device": "cpu"}, {"device": "cuda", "cuda_graphs": False}):
        assert estimate_memory_bytes(tiny_model_path, {**without_prefixes, **off}, stored) == int(stored * LOAD_OVERHEAD)
    with_prefixes = estimate_memory_bytes(tiny_model_path, {"engine": "transformers", "device": "cpu", "prefix_cache_mib": 64}, stored)
    assert with_prefixes == int(stored * LOAD_OVERHEAD) + 64 * 2**20  # the prefix cache at its most
    assert estimate_memory_bytes(tiny_model_path, {"engine": "transformers", "device": "cpu", "enable_prefix_caching": False}, stored) == int(stored * LOAD_OVERHEAD)


def test_unused_columns_are_dropped_only_when_that_shrinks_the_window():
    assert columns_to_drop(0, 600) == 0  # nothing unused
    assert columns_to_drop(10, 600) == 0  # 591 columns still need a window of 1,024
    assert columns_to_drop(100, 600) == 100  # 501 fit in 512
    assert columns_to_drop(100, 200) == 0  # already the smallest window


@pytest.fixture(scope="module")
def model(tiny_model_path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32, attn_implementation="sdpa").eval()


def _prefill(model, prompts: list[list[int]]):
    length = max(len(p) for p in prompts)
    input_ids = torch.zeros((len(prompts), length), dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt) :] = torch.tensor(prompt)
        mask[row, length - len(prompt) :] = 1
    cache = new_cache(model.config)
    logits = forward(model, input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache)
    return cache, mask, logits.argmax(-1).tolist()


def test_static_rows_give_the_padded_rows_logits_through_joins_and_departures(model):
    """Two row caches driven alike: rows join with prompts of other lengths (one longer than
    the running rows' columns, so they shift right), rows leave from the middle, the window
    grows past MIN_WINDOW, and unused columns are shifted out. And each row's keys and values,
    as the prefix cache reads them (`row_kv`), are those of its tokens prefilled alone."""
    assert can_use_static_rows(model)
    torch.manual_seed(0)
    padded, static = PaddedRows(model), StaticRows(model, max_rows=6, use_graphs=False)
    last: list[int] = []
    histories: list[list[int]] = []  # per row, the tokens its cache holds
    static.prepare(_prefill(model, [[0]])[0])  # what the engine does once loaded
    assert static.capacity == MIN_WINDOW and static.describe() == f"eager steps, static cache of {MIN_WINDOW} columns"

    def join(prompts):
        for rows in (padded, static):
            cache, mask, first = _prefill(model, prompts)
            rows.join(cache, mask)
        last.extend(first)
        histories.extend(list(p) for p in prompts)

    def decode(steps):
        for _ in range(steps):
            for history, token_id in zip(histories, last, strict=True):
                history.append(token_id)
            expected, got = padded.decode(last), static.decode(last)
            # float32 sums in another order: about 1e-5 apart; a wrong row or column is off by whole units
            assert torch.allclose(got, expected, atol=1e-3), (got - expected).abs().max()
            last[:] = expected.argmax(-1).tolist()

    def keep(rows):
        padded.keep(rows)
        static.keep(rows)
        last[:] = [last[row] for row in rows]
        histories[:] = [histories[row] for row in rows]

    def check_row_kv():
        for row, history in enumerate(histories):
            alone = _prefill(model, [history])[0].layers
            for rows in (padded, static):
                for (keys, values), layer in zip(rows.row_kv(row), alone, strict=True):
                    assert keys.shape == layer.keys[0].shape and torch.allclose(keys, layer.keys[0], atol=1e-3)
                    assert torch.allclose(values, layer.values[0], atol=1e-3)

    prompt = lambda n: torch.randint(0, model.config.vocab_size, (n,)).tolist()  # noqa: E731
    join([prompt(5), prompt(9)])
    decode(4)
    join([prompt(30)])  # longer than the 13 columns in use: the running rows shift right
    decode(3)
    check_row_kv()
    keep([0, 2])  # a row leaves from the middle
    join([prompt(3), prompt(4), prompt(7)])
    decode(240)  # from column 33 to 273: the window doubles, and the buffers grow
    assert static.capacity == 2 * MIN_WINDOW
    keep([3, 4])  # the oldest rows leave; the rest start at columns 29 and 26
    decode(1)  # 248 columns in use fit the smallest window: the first 26 are dropped
    assert static.next_column == 273 - 26 + 1
    check_row_kv()
    decode(20)
    keep([])
    join([prompt(6)])  # a new batch starts at column 6
    decode(2)
    assert static.next_column == 8
