from __future__ import annotations

import torch

from server.engines.base import SamplingParams
from server.engines.sampler import make_generator, sample_token

CPU = torch.device("cpu")


def test_sampler_greedy_takes_the_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    params = SamplingParams(max_tokens=1, temperature=0)
    assert make_generator(params, CPU) is None
    assert sample_token(logits, params, None) == 1


def test_sampler_same_seed_same_tokens():
    logits = torch.zeros(1000)
    params = SamplingParams(max_tokens=1, temperature=1.0, seed=42)

    def draw():
        generator = make_generator(params, CPU)
        return [sample_token(logits, params, generator) for _ in range(20)]

    assert draw() == draw()
    assert len(set(draw())) > 1


def test_sampler_top_p_keeps_only_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two tokens only
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.7, seed=0)
    generator = make_generator(params, CPU)
    drawn = {sample_token(logits, params, generator) for _ in range(300)}
    assert drawn == {0, 1}


def test_sampler_tiny_top_p_still_keeps_one_token():
    logits = torch.tensor([1.0, 5.0, 2.0])
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=1e-6, seed=0)
    generator = make_generator(params, CPU)
    assert {sample_token(logits, params, generator) for _ in range(50)} == {1}
