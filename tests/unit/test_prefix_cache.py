"""The prefix cache's rules, on KV tensors that spell out their prompt's tokens (a position's
key is its token id), so what a hit hands back can be read."""

from __future__ import annotations

import pytest
import torch

from server.engines import prefix_cache
from server.engines.prefix_cache import BLOCK, PrefixCache, reusable_length

NUM_LAYERS = 2


def kv_of(prompt: list[int]):
    """The prompt's KV as a prefill leaves it: per layer, (heads 1, tokens, dim 1)."""

    def first(length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        keys = torch.tensor(prompt[:length], dtype=torch.float32).reshape(1, length, 1)
        return [(keys + layer, -keys - layer) for layer in range(NUM_LAYERS)]

    return first


def kept(cache: PrefixCache, *prompts: list[int]) -> PrefixCache:
    for prompt in prompts:
        cache.keep(prompt, kv_of(prompt))
    return cache


def entry_bytes(num_tokens: int) -> int:
    return NUM_LAYERS * 2 * num_tokens * 4


def prompt(start: int, length: int) -> list[int]:
    return list(range(start, start + length))


@pytest.mark.parametrize(("num_tokens", "reusable"), [(1, 0), (16, 0), (17, 16), (32, 16), (33, 32), (100, 96)])
def test_a_prefix_is_whole_blocks_and_never_the_whole_prompt(num_tokens, reusable):
    assert reusable_length(num_tokens) == reusable


def test_a_prompt_reuses_the_longest_run_of_whole_blocks_it_shares_with_a_kept_one():
    cache = kept(PrefixCache(2**20), prompt(0, 40))
    assert cache.lookup(prompt(0, 10)) is None  # shorter than a block
    assert cache.lookup(prompt(100, 40)) is None  # shares nothing
    assert cache.lookup(prompt(0, 40)).length == 32  # the same prompt: all but its last partial block
    shares_20 = prompt(0, 20) + prompt(500, 30)
    hit = cache.lookup(shares_20)
    assert hit.length == 16
    for layer, (keys, values) in enumerate(hit.layers()):  # a batch of one row: the first 16 tokens' KV
        assert keys.shape == (1, 1, 16, 1) and keys.flatten().tolist() == [t + layer for t in range(16)]
        assert values.flatten().tolist() == [-t - layer for t in range(16)]
    assert cache.num_hit_tokens == 32 + 16


def test_the_next_turn_of_a_chat_replaces_the_turn_before_it():
    first_turn = prompt(0, 40)
    second_turn = first_turn + prompt(900, 50)
    cache = kept(PrefixCache(2**20), first_turn, second_turn)
    assert len(cache) == 1 and cache.num_bytes == entry_bytes(80)
    assert cache.lookup(first_turn).length == 32 and cache.lookup(second_turn + [1]).length == 80
    kept(cache, first_turn)  # held already, inside the second turn's
    assert len(cache) == 1


def test_prompts_that_part_ways_are_kept_apart_and_each_found():
    shared = prompt(0, 16)
    left, right = shared + prompt(100, 24), shared + prompt(200, 24)
    cache = kept(PrefixCache(2**20), left, right)
    assert len(cache) == 2
    assert cache.lookup(left).length == 32 and cache.lookup(right).length == 32
    assert cache.lookup(shared + prompt(300, 24)).length == 16


def test_the_least_recently_used_prefix_goes_when_the_bytes_run_out():
    a, b, c = prompt(0, 40), prompt(1000, 40), prompt(2000, 40)
    cache = kept(PrefixCache(2 * entry_bytes(32)), a, b)
    assert cache.lookup(a) is not None  # a is used again: b is the oldest now
    kept(cache, c)
    assert (cache.lookup(a) is not None, cache.lookup(b) is None, cache.lookup(c) is not None) == (True, True, True)
    assert cache.num_bytes == 2 * entry_bytes(32)


def test_a_prefix_larger_than_the_whole_cache_is_not_kept():
    cache = kept(PrefixCache(entry_bytes(32) - 1), prompt(0, 40))
    assert len(cache) == 0 and cache.num_bytes == 0


def test_a_hash_collision_costs_a_miss_never_another_prompts_kv(monkeypatch):
    monkeypatch.setattr(prefix_cache, "block_hashes", lambda token_ids, length: list(range(length // BLOCK)))  # every prompt collides
    cache = kept(PrefixCache(2**20), prompt(0, 40))
    assert cache.lookup(prompt(50, 40)) is None
    assert cache.lookup(prompt(0, 40)).length == 32


def test_kept_kv_is_a_copy_and_clear_forgets_it():
    source = prompt(0, 40)
    layers = kv_of(source)(32)
    cache = PrefixCache(2**20)
    cache.keep(source, lambda length: [(k[:, :length], v[:, :length]) for k, v in layers])
    layers[0][0].fill_(7.0)  # the prefill's cache is reused later: what was kept must not change with it
    assert cache.lookup(source).layers()[0][0].flatten().tolist() == list(map(float, range(32)))
    cache.clear()
    assert (len(cache), cache.num_bytes, cache.lookup(source)) == (0, 0, None)
