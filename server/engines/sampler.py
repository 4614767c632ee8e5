"""Next-token choice for a batch: each row's penalties and biases, then one draw for every
row at once (`kernels/sampling.py`); and a chosen token's log-probability when asked."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from kernels.sampling import sample
from server.engines.base import SamplingParams


def row_seed(params: SamplingParams) -> int:
    """The seed a generation draws with: the request's, else a fresh random one."""
    return params.seed if params.seed is not None else secrets.randbits(63)


def choose_tokens(logits: torch.Tensor, params: Sequence[SamplingParams], seeds: Sequence[int], steps: Sequence[int]) -> list[int]:
    """One token id per row of (adjusted) logits, in one sampling call and one copy to the
    host. `steps[i]` counts the tokens row i has generated: with its seed, it fixes the draw."""
    device = logits.device
    temperatures_and_top_ps = torch.tensor([[0.0 if p.is_greedy else p.temperature for p in params], [p.top_p for p in params]]).to(device)
    seeds_and_steps = torch.tensor([list(seeds), list(steps)], dtype=torch.int64).to(device)
    chosen = sample(logits, *temperatures_and_top_ps, *seeds_and_steps)
    return chosen.tolist()


def adjusted_logits(logits: torch.Tensor, params: SamplingParams, output_token_ids: Sequence[int]) -> torch.Tensor:
    """OpenAI's penalties over the tokens generated so far (not the prompt's, as vLLM
    does), then the request's logit bias."""
    logits = logits.float()
    if not params.adjusts_logits:
        return logits
    logits = logits.clone()
    if output_token_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_token_ids, device=logits.device), minlength=logits.shape[-1])[: logits.shape[-1]]
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    if params.logit_bias:
        ids = torch.tensor([token_id for token_id, _ in params.logit_bias], device=logits.device)
        logits[ids] += torch.tensor([bias for _, bias in params.logit_bias], device=logits.device)
    return logits


def token_logprobs(logits: torch.Tensor, params: SamplingParams, token_id: int, num_top: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability and the `num_top` most likely tokens', from the
    distribution it was drawn from: log-softmax after temperature (greedy: of the logits)."""
    scaled = logits.float() if params.is_greedy else logits.float() / params.temperature
    logprobs = torch.log_softmax(scaled, dim=-1)
    top = torch.topk(logprobs, num_top) if num_top else None
    best = [] if top is None else [(int(i), float(v)) for v, i in zip(top.values, top.indices)]
    return float(logprobs[token_id]), best
