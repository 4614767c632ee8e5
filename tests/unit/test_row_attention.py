"""Row-by-row attention for the padded row cache: the rule for when a step takes it, and the
same logits as padded sdpa through joins of very different lengths and a departure."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from server.engines.kv_cache import PaddedRows, forward, left_padded, new_cache, positions_of
from server.engines.row_attention import ROW_ATTENTION, attends_per_row, use_row_attention


@pytest.mark.parametrize(
    ("lengths", "num_columns", "per_row"),
    [
        ([100], 100, False),  # one row: nothing is padded
        ([30, 30, 30], 30, False),
        ([60, 100], 100, False),  # 200 columns attended for 160 tokens
        ([50, 100], 100, False),  # 200 for 150: padding is a quarter
        ([10, 10, 10, 100], 100, True),  # 400 for 130
        ([5, 2700], 2700, False),  # half of it padding: batched
        ([5, 5, 2700], 2700, True),
    ],
)
def test_a_step_attends_row_by_row_only_where_padding_would_be_most_of_the_work(lengths, num_columns, per_row):
    assert attends_per_row(lengths, num_columns) is per_row


def _model(path, attention: str = "sdpa"):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention).eval()


def _prefill(model, prompts: list[list[int]]):
    input_ids, mask = left_padded(prompts, 0, model.device)
    cache = new_cache(model.config)
    return cache, mask, forward(model, input_ids, mask, positions_of(mask), cache)


def test_row_by_row_steps_give_the_padded_steps_logits_through_joins_and_a_departure(tiny_model_path):
    padded_model, row_model = _model(tiny_model_path), _model(tiny_model_path)
    assert use_row_attention(row_model) and row_model.config._attn_implementation == ROW_ATTENTION
    padded, by_row = PaddedRows(padded_model), PaddedRows(row_model, per_row=True)
    torch.manual_seed(0)
    prompt = lambda n: torch.randint(0, padded_model.config.vocab_size, (n,)).tolist()  # noqa: E731
    last: list[int] = []
    for prompts in ([prompt(3), prompt(5), prompt(4)], [prompt(120)]):  # short rows, then a long one joins
        (cache, mask, logits), (row_cache, row_mask, row_logits) = _prefill(padded_model, prompts), _prefill(row_model, prompts)
        assert torch.allclose(row_logits, logits, atol=1e-4)  # a prefill is sdpa's, unchanged
        padded.join(cache, mask)
        by_row.join(row_cache, row_mask)
        last += logits.argmax(-1).tolist()

    def decode(steps: int) -> None:
        for _ in range(steps):
            expected, got = padded.decode(last), by_row.decode(last)
            assert torch.allclose(got, expected, atol=1e-3), (got - expected).abs().max()
            last[:] = expected.argmax(-1).tolist()

    decode(10)
    assert by_row.num_row_steps == 10 and padded.num_row_steps == 0
    padded.keep([0, 1, 2])  # the long row leaves: the padding is trimmed, and steps are batched again
    by_row.keep([0, 1, 2])
    del last[3]
    decode(5)
    assert by_row.num_row_steps == 10
    assert by_row.describe() == "eager steps, padded cache, 10 steps attended row by row"


def test_a_model_that_attends_eagerly_keeps_its_own_attention(tiny_model_path):
    model = _model(tiny_model_path, "eager")
    assert not use_row_attention(model) and model.config._attn_implementation == "eager"
