"""The KV cache's spare columns: the same keys and values as transformers' DynamicLayer,
written in place on decode steps, and correct again after the batch replaces them."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from server.engines.kv_cache import SpareColumnsLayer


def _steps(layer, states: list[torch.Tensor]) -> list[torch.Tensor]:
    return [layer.update(s, s * 2)[0].clone() for s in states]


def test_it_holds_what_a_dynamic_layer_holds_and_decodes_in_place():
    torch.manual_seed(0)
    states = [torch.randn(3, 2, 5, 4)] + [torch.randn(3, 2, 1, 4) for _ in range(100)]  # a prefill, then decode steps
    spare, plain = SpareColumnsLayer(), DynamicLayer()
    assert all(torch.equal(a, b) for a, b in zip(_steps(spare, states), _steps(plain, states), strict=True))
    assert torch.equal(spare.values, plain.values) and spare.get_seq_length() == 105
    buffer, capacity = spare.keys.data_ptr(), spare.capacity
    spare.update(torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4))
    assert spare.keys.data_ptr() == buffer and spare.capacity == capacity  # written in place, nothing copied


def test_rows_cut_joined_or_trimmed_are_taken_into_fresh_buffers():
    torch.manual_seed(1)
    spare, plain = SpareColumnsLayer(), DynamicLayer()
    for layer in (spare, plain):
        layer.update(torch.arange(3 * 2 * 6 * 4.0).reshape(3, 2, 6, 4), torch.ones(3, 2, 6, 4))
    rows = torch.tensor([0, 2])
    for layer in (spare, plain):  # what ContinuousBatch does: cut a row, trim two columns, join a row
        layer.batch_select_indices(rows)
        layer.keys, layer.values = layer.keys[:, :, 2:], layer.values[:, :, 2:]
        layer.keys = torch.cat([layer.keys, torch.full((1, 2, 4, 4), 7.0)])
        layer.values = torch.cat([layer.values, torch.full((1, 2, 4, 4), 8.0)])
    new = torch.randn(3, 2, 1, 4)
    assert torch.equal(spare.update(new, new)[0], plain.update(new, new)[0])
    assert torch.equal(spare.values, plain.values)
