from __future__ import annotations

import pytest
import torch

from server.engines.base import SamplingParams
from server.engines import sampler
from server.engines.sampler import adjusted_logits, choose_tokens, row_seed, token_logprobs, truncated

GREEDY = SamplingParams(max_tokens=1, temperature=0)


def test_greedy_rows_take_the_argmax_and_tiny_temperatures_are_greedy():
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0], [4.0, 0.0, 0.0, 0.0]])
    tiny = SamplingParams(max_tokens=1, temperature=1e-40)  # would overflow a softmax
    assert tiny.is_greedy
    assert choose_tokens(logits, [GREEDY, tiny], [0, 0], [0, 0]) == [1, 0]


def test_a_seed_and_a_step_fix_the_draw_whatever_else_is_in_the_batch():
    row = torch.zeros(1, 1000)
    sampled = SamplingParams(max_tokens=1, temperature=1.0, seed=42)

    def draws(batch_size: int) -> list[int]:
        logits = torch.cat([row, torch.randn(batch_size - 1, 1000)])
        params = [sampled] + [SamplingParams(max_tokens=1, temperature=0.8)] * (batch_size - 1)
        return [choose_tokens(logits, params, [42] + [7] * (batch_size - 1), [step] * batch_size)[0] for step in range(20)]

    assert draws(1) == draws(3) == draws(5)
    assert len(set(draws(1))) > 1


def test_unseeded_rows_get_different_seeds():
    params = SamplingParams(max_tokens=1)
    assert row_seed(SamplingParams(max_tokens=1, seed=5)) == 5
    assert len({row_seed(params) for _ in range(10)}) == 10


def test_penalties_count_generated_tokens_and_bias_adds():
    params = SamplingParams(max_tokens=1, presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((3, 2.0),))
    adjusted = adjusted_logits(torch.zeros(4), params, torch.tensor([], dtype=torch.long), [1, 1, 2])
    assert adjusted.tolist() == [0.0, -1.0, -0.75, 2.0]


def test_logprobs_are_the_log_softmax_of_the_logits_as_given():
    logits = torch.tensor([2.0, 1.0, 0.0])
    logprob, top = token_logprobs(logits, 1, 2)
    expected = torch.log_softmax(logits, dim=-1)
    assert abs(logprob - float(expected[1])) < 1e-6
    assert [token for token, _ in top] == [0, 1] and abs(top[1][1] - float(expected[1])) < 1e-6


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_prompt_and_output():
    params = SamplingParams(max_tokens=1, repetition_penalty=2.0)
    adjusted = adjusted_logits(torch.tensor([4.0, -4.0, 4.0, 1.0]), params, torch.tensor([0]), [1])
    assert adjusted.tolist() == [2.0, -8.0, 4.0, 1.0]


def test_top_k_and_min_p_leave_only_their_tokens_to_draw_and_other_rows_alone():
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.0], [3.0, 2.0, 2.0, 1.0, 0.0], [3.0, 2.0, 2.0, 1.0, 0.0]])
    top_two = SamplingParams(max_tokens=1, top_k=2)  # ties with the 2nd best stay
    half = SamplingParams(max_tokens=1, temperature=0.5, min_p=0.2)  # p_i >= 0.2 p_max: l_i >= 3 + 0.5 ln 0.2 = 2.2
    plain = SamplingParams(max_tokens=1)
    cut = truncated(logits, [top_two, half, plain])
    assert torch.isinf(cut[0]).tolist() == [False, False, False, True, True]
    assert torch.isinf(cut[1]).tolist() == [False, True, True, True, True]
    assert torch.equal(cut[2], logits[2]) and not torch.isinf(logits).any()
    assert truncated(logits, [plain] * 3) is logits


def test_a_top_k_of_one_draws_the_best_token_every_time():
    logits = torch.randn(1, 500)
    params = SamplingParams(max_tokens=1, temperature=1.5, top_k=1)
    draws = {choose_tokens(truncated(logits, [params]), [params], [3], [step])[0] for step in range(30)}
    assert draws == {int(logits.argmax())}
    free = SamplingParams(max_tokens=1, temperature=1.5)
    assert len({choose_tokens(logits, [free], [3], [step])[0] for step in range(30)}) > 1


def test_truncation_of_a_whole_batch_matches_the_rule_row_by_row():
    """The batched masks against the rule written out per row, over random rows and settings."""
    import math
    import random

    def by_rule(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
        kept = torch.ones_like(row, dtype=torch.bool)
        if p.min_p > 0:
            probs = torch.softmax(row / p.temperature, dim=-1)
            kept &= probs >= p.min_p * probs.max() * (1 - 1e-5)
        if 0 < p.top_k < row.shape[-1]:
            kept &= row >= row.sort(descending=True).values[p.top_k - 1]
        return kept

    generator = random.Random(7)
    for _ in range(20):
        params = [
            SamplingParams(max_tokens=1, temperature=generator.choice([0.0, 0.5, 1.3]), top_k=generator.choice([0, 1, 5, 64, 10_000]), min_p=generator.choice([0.0, 0.05, 0.5]))
            for _ in range(6)
        ]
        logits = torch.randn(6, 64) * 3
        cut = truncated(logits, params)
        for row, p in enumerate(params):
            expected = by_rule(logits[row], p) if p.truncates else torch.ones(64, dtype=torch.bool)
            assert torch.equal(~torch.isinf(cut[row]), expected), (p, row)
            assert math.isfinite(float(cut[row].max()))


def test_prompt_logprobs_score_each_next_token_across_chunk_boundaries():
    """Positions are scored in chunks of PROMPT_LOGPROB_ROWS: every position, the same as at once,
    with the rank of the prompt's token among the vocabulary."""
    num_positions = sampler.PROMPT_LOGPROB_ROWS * 2 + 3
    logits = torch.randn(num_positions, 40, generator=torch.Generator().manual_seed(0))
    next_ids = torch.randint(0, 40, (num_positions,), generator=torch.Generator().manual_seed(1)).tolist()
    scored = sampler.prompt_logprobs(logits.to(torch.bfloat16), next_ids, 3)
    expected = torch.log_softmax(logits.to(torch.bfloat16).float(), dim=-1)
    assert len(scored) == num_positions
    for position, (logprob, rank, top) in enumerate(scored):
        assert logprob == pytest.approx(float(expected[position, next_ids[position]]), abs=1e-5)
        assert rank == int((expected[position] > expected[position, next_ids[position]]).sum()) + 1  # 1: the most likely
        assert [i for i, _ in top] == expected[position].topk(3).indices.tolist()
    assert {rank for _, rank, _ in scored} > {1}  # ranks vary: random prompts are not the model's best guesses
    assert sampler.prompt_logprobs(logits[:0], [], 2) == [] and sampler.prompt_logprobs(logits[:2], next_ids[:2], 0)[0][2] == []

