"""Next-token choice for a batch: each row's penalties and biases, then one draw for every
row at once (`kernels/sampling.py`); and a chosen token's log-probability when asked, or a
prompt's tokens'."""

from __future__ import annotations

import math
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


def adjusted_logits(logits: torch.Tensor, params: SamplingParams, prompt_ids: torch.Tensor, output_token_ids: Sequence[int]) -> torch.Tensor:
    """The request's logit bias, then its penalties, in vLLM's order: repetition over the
    tokens of the prompt (`prompt_ids`, distinct, on the logits' device) and the output (as
    vLLM and transformers have it), presence and frequency over the output's only (OpenAI's)."""
    logits = logits.float()
    if not params.adjusts_logits:
        return logits
    logits = logits.clone()
    if params.logit_bias:
        ids = torch.tensor([token_id for token_id, _ in params.logit_bias], device=logits.device)
        logits[ids] += torch.tensor([bias for _, bias in params.logit_bias], device=logits.device)
    if params.repetition_penalty != 1.0:
        seen = torch.cat([prompt_ids, torch.tensor(output_token_ids, dtype=torch.long, device=logits.device)]).unique()
        seen = seen[seen < logits.shape[-1]]
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if output_token_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_token_ids, device=logits.device), minlength=logits.shape[-1])[: logits.shape[-1]]
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return logits


def truncated(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """What each row may draw from: rows with top_k or min_p get every other token at -inf,
    in a copy (log-probabilities are reported from the logits before it, as vLLM's are);
    the same tensor where no row truncates. top_p comes after, in the draw. Rules: min_p on
    the distribution after temperature, p_i >= min_p * p_max, that is l_i >= l_max + T ln(min_p);
    top_k keeps every token tied with the k-th best. All rows at once: a few kernels a step
    whatever the batch (a model's defaults can make every request truncate)."""
    rows = [row for row, p in enumerate(params) if p.truncates]
    if not rows:
        return logits
    device, vocab_size = logits.device, logits.shape[-1]
    chosen = [params[row] for row in rows]
    picked = logits[rows]
    floors = torch.full((len(rows),), -torch.inf, device=device)
    if any(p.min_p > 0.0 for p in chosen):
        spreads = torch.tensor([p.temperature * math.log(p.min_p) if p.min_p > 0.0 else -math.inf for p in chosen], device=device)
        floors = torch.maximum(floors, picked.max(dim=-1).values + spreads)
    top_ks = [min(p.top_k, vocab_size) for p in chosen]  # 0: no top-k for that row
    if any(top_ks):
        best = picked.topk(max(top_ks), dim=-1).values
        kth = best.gather(-1, torch.tensor([[max(k, 1) - 1] for k in top_ks], device=device)).squeeze(-1)
        floors = torch.maximum(floors, torch.where(torch.tensor(top_ks, device=device) > 0, kth, -torch.inf))
    logits = logits.clone()
    logits[rows] = picked.masked_fill(picked < floors[:, None], -torch.inf)
    return logits


def token_logprobs(logits: torch.Tensor, token_id: int, num_top: int) -> tuple[float, list[tuple[int, float]]]:
    """The chosen token's log-probability and the `num_top` most likely tokens': log-softmax
    of `logits` as they are (no temperature: the model's distribution, as vLLM reports it)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logprobs, num_top) if num_top else None
    best = [] if top is None else [(int(i), float(v)) for v, i in zip(top.values, top.indices)]
    return float(logprobs[token_id]), best


PROMPT_LOGPROB_ROWS = 512  # positions made float32 and log-softmaxed at a time: an 8k prompt of a 150k vocabulary would take 5 GB at once


def prompt_logprobs(logits: torch.Tensor, next_ids: Sequence[int], num_top: int) -> list[tuple[float, int, list[tuple[int, float]]]]:
    """For each position of `logits` (positions, vocabulary), the log-probability of the token
    that came next in the prompt, its rank (1: the most likely; ties share the better rank)
    and the `num_top` most likely, from the raw logits (no temperature, no penalty: the prompt
    was not drawn), as vLLM reports prompt logprobs."""
    scored = []
    targets = torch.tensor(list(next_ids), dtype=torch.long, device=logits.device)
    for start in range(0, len(targets), PROMPT_LOGPROB_ROWS):
        logprobs = torch.log_softmax(logits[start : start + PROMPT_LOGPROB_ROWS].float(), dim=-1)
        chosen = logprobs.gather(-1, targets[start : start + PROMPT_LOGPROB_ROWS, None])
        ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
        top = logprobs.topk(num_top, dim=-1) if num_top else None
        best = [[]] * len(ranks) if top is None else [list(zip(ids, values)) for ids, values in zip(top.indices.tolist(), top.values.tolist())]
        scored += list(zip(chosen.squeeze(-1).tolist(), ranks, best))
    return scored
