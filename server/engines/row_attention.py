"""Decode steps that attend each row over its own tokens only, for the padded row cache
(`kv_cache.PaddedRows`). Its rows are left-padded to the longest, so one long prompt in the
batch makes every row attend over its length: with 4 rows of 30 tokens and one of 2,700
(SmolLM2-135M, 2 cores), a step took 275 ms padded and 66 ms row by row in float32, 102 and
48 ms in bfloat16.

Rules: only for a model that attends through sdpa and lets extra arguments reach its
attention (transformers' functional attention); its attention is then ROW_ATTENTION, which is
sdpa itself for a prefill and for every step not given `row_starts`. A step attends row by row
only where padding would be most of its attention's work (`attends_per_row`).
"""

from __future__ import annotations

import inspect

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ROW_ATTENTION = "baton_rows"


def attends_per_row(lengths: list[int], num_columns: int) -> bool:
    """Row by row when the padded batch would attend over more than twice the tokens its
    rows hold (one sdpa call per row and layer costs more than a batched one otherwise)."""
    return len(lengths) > 1 and len(lengths) * num_columns > 2 * sum(lengths)


def rows_attention(module, query, key, value, attention_mask, row_starts: list[int] | None = None, **kwargs):
    """sdpa; for a decode step given `row_starts` (each row's first column that is not
    padding), one sdpa call per row over its own columns, with no mask."""
    if row_starts is None or query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows = [sdpa_attention_forward(module, query[row : row + 1], key[row : row + 1, :, start:], value[row : row + 1, :, start:], None, **kwargs)[0] for row, start in enumerate(row_starts)]
    return torch.cat(rows), None


def use_row_attention(model) -> bool:
    """Makes `model` attend through ROW_ATTENTION where the rules allow; says whether it does."""
    takes_extra_arguments = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(model.forward).parameters.values())
    if model.config._attn_implementation != "sdpa" or not takes_extra_arguments or not model._can_set_attn_implementation():
        return False
    AttentionInterface.register(ROW_ATTENTION, rows_attention)
    AttentionMaskInterface.register(ROW_ATTENTION, sdpa_mask)
    model.set_attn_implementation(ROW_ATTENTION)
    return model.config._attn_implementation == ROW_ATTENTION
