"""Next-token choice for one row of logits: penalties and biases, then greedy, or
temperature and nucleus sampling; and the chosen token's log-probability when asked."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.engines.base import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """Greedy rows need no randomness; a seeded row gets its own reproducible stream."""
    if params.is_greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


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


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Choose one token id from a 1-D row of (adjusted) logits."""
    if params.is_greedy:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        probs = _nucleus(probs, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(logits: torch.Tensor, params: SamplingParams, token_id: int, num_top: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability and the `num_top` most likely tokens', from the
    distribution it was drawn from: log-softmax after temperature (greedy: of the logits)."""
    scaled = logits.float() if params.is_greedy else logits.float() / params.temperature
    logprobs = torch.log_softmax(scaled, dim=-1)
    top = torch.topk(logprobs, num_top) if num_top else None
    best = [] if top is None else [(int(i), float(v)) for v, i in zip(top.values, top.indices)]
    return float(logprobs[token_id]), best


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one)."""
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs[mass_before >= top_p] = 0.0
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
