"""Next-token sampling for a whole batch in one call: a Triton kernel for CUDA and a plain
torch reference with the same contract, which the CPU path runs and the tests compare to.

The contract, per row `i` of `logits` (rows x vocabulary):
- `temperatures[i] == 0`: greedy, the first index of the row's largest logit.
- otherwise a draw from softmax(logits[i] / temperatures[i]) restricted to the nucleus: the
  tokens whose probability is at least that of the least likely token of the smallest
  most-likely set whose mass reaches `top_ps[i]` (ties at that edge are all kept).
- the draw's randomness depends only on (`seeds[i]`, `steps[i]`), never on the other rows:
  a seeded request gets the same tokens whatever shares its batch.
Draws use the Gumbel-max rule (argmax of scaled logits plus Gumbel noise), which needs no
sort and no cumulative sum: the kernel reads a row twice (about 33 times with top-p below 1,
whose edge it finds by bisection) and writes one id.
"""

from __future__ import annotations

import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None  # Linux wheels; elsewhere the reference serves

_UINT64 = 2**64
NUCLEUS_CANDIDATES = 1024  # the reference looks for a row's nucleus among these first


def sample(logits: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One token id per row (int64, on the logits' device): the kernel on CUDA, the reference elsewhere."""
    if logits.is_cuda and HAS_TRITON:
        return sample_triton(logits, temperatures, top_ps, seeds, steps)
    return sample_reference(logits, temperatures, top_ps, seeds, steps)


def sample_reference(logits: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    chosen = logits.argmax(dim=-1)
    rows = [i for i, t in enumerate(temperatures.tolist()) if t > 0.0]
    if not rows:
        return chosen
    scaled = logits[rows] / temperatures[rows, None].float()
    noise = torch.stack([_gumbel_noise(logits.shape[-1], int(seeds[i]), int(steps[i])) for i in rows]).to(logits.device)
    scores = scaled + noise
    if (top_ps[rows] < 1.0).any():  # top_p 1 keeps every token: no nucleus to find
        in_nucleus = _nucleus_mask(torch.softmax(scaled, dim=-1), top_ps[rows].float())
        scores = torch.where(in_nucleus, scores, -torch.inf)
    chosen[rows] = scores.argmax(dim=-1)
    return chosen


def sample_triton(logits: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """The kernel, one program per row. Runs on CPU tensors too when TRITON_INTERPRET=1 was
    set before its first use."""
    from kernels.sampling_triton import launch  # imports Triton, which CPU serving never needs

    return launch(logits, temperatures, top_ps, seeds, steps)


# -- the reference's pieces -----------------------------------------------------------------


def _nucleus_mask(probs: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """True for the tokens of each row's nucleus (see the module's contract). Rule: the
    most likely NUCLEUS_CANDIDATES tokens are sorted first (a top-k, far cheaper than sorting
    the vocabulary); only a row whose nucleus reaches past them sorts the whole row."""
    sorted_probs = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1).values
    if (sorted_probs.sum(dim=-1) < top_ps).any():
        sorted_probs, _ = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    kept = torch.where(mass_before < top_ps[:, None], sorted_probs, torch.inf)
    kept[:, 0] = sorted_probs[:, 0]  # at least the most likely token, whatever top_p
    return probs >= kept.min(dim=-1, keepdim=True).values


def _gumbel_noise(vocab_size: int, seed: int, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(_stream_seed(seed, step))
    uniform = torch.rand(vocab_size, generator=generator)
    return -torch.log(-torch.log(uniform))


def _stream_seed(seed: int, step: int) -> int:
    """splitmix64 of (seed, step): one independent stream per row and step."""
    x = (seed * 0x9E3779B97F4A7C15 + step + 1) % _UINT64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % _UINT64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % _UINT64
    return x ^ (x >> 31)
