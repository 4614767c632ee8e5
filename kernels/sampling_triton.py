"""The Triton half of `kernels/sampling.py` (read its contract there)."""

import torch
import triton
import triton.language as tl

THRESHOLD_SEARCH_STEPS = 31  # float32 bit patterns of [0, 1] span fewer than 2**30 values


def launch(logits: torch.Tensor, temperatures: torch.Tensor, top_ps: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    num_rows, vocab_size = logits.shape
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    chosen = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    _sample_rows[(num_rows,)](
        logits, logits.stride(0), vocab_size,
        temperatures.float().contiguous(), top_ps.float().contiguous(),
        seeds.to(torch.int64).contiguous(), steps.to(torch.int64).contiguous(), chosen,
        BLOCK=min(4096, triton.next_power_of_2(vocab_size)), SEARCH_STEPS=THRESHOLD_SEARCH_STEPS,
    )  # fmt: skip
    return chosen


@triton.jit
def _sample_rows(
    logits_ptr, row_stride, vocab_size,
    temperatures_ptr, top_ps_ptr, seeds_ptr, steps_ptr, chosen_ptr,
    BLOCK: tl.constexpr, SEARCH_STEPS: tl.constexpr,
):  # fmt: skip
    """Rules: pass 1 finds the row's max (and greedy answer); pass 2 its softmax mass; a
    bisection over float32 bit patterns finds the nucleus edge exactly; the last pass takes
    the argmax of scaled logits plus Gumbel noise over the nucleus. Noise for token t at
    step s is Philox(seed, s * vocab + t), so rows never share or shift a stream."""
    row = tl.program_id(0)
    row_start = logits_ptr + row.to(tl.int64) * row_stride
    temperature = tl.load(temperatures_ptr + row)
    offsets = tl.arange(0, BLOCK)

    best = -float("inf")
    best_index = 0
    for start in range(0, vocab_size, BLOCK):
        x = tl.load(row_start + start + offsets, mask=start + offsets < vocab_size, other=-float("inf")).to(tl.float32)
        block_best = tl.max(x, axis=0)
        block_index = start + tl.argmax(x, axis=0)
        best_index = tl.where(block_best > best, block_index, best_index)
        best = tl.maximum(best, block_best)
    chosen = best_index.to(tl.int64)

    if temperature > 0.0:
        top_p = tl.load(top_ps_ptr + row)
        seed = tl.load(seeds_ptr + row)
        step = tl.load(steps_ptr + row)
        low = tl.zeros((), dtype=tl.int32)  # top_p 1: the threshold 0 keeps every token
        if top_p < 1.0:
            # Unnormalised probabilities q = exp((x - best) / T) lie in (0, 1]; q of the best is 1.
            total = 0.0
            for start in range(0, vocab_size, BLOCK):
                x = tl.load(row_start + start + offsets, mask=start + offsets < vocab_size, other=-float("inf")).to(tl.float32)
                total += tl.sum(tl.exp((x - best) / temperature), axis=0)
            target = top_p * total
            # Largest threshold whose kept mass reaches the target: invariant mass(q >= low) >= target > mass(q >= high).
            high = tl.full((), 0x3F800001, dtype=tl.int32)  # just above 1.0
            for _ in range(SEARCH_STEPS):
                middle = low + (high - low) // 2
                threshold = middle.to(tl.float32, bitcast=True)
                mass = 0.0
                for start in range(0, vocab_size, BLOCK):
                    x = tl.load(row_start + start + offsets, mask=start + offsets < vocab_size, other=-float("inf")).to(tl.float32)
                    q = tl.exp((x - best) / temperature)
                    mass += tl.sum(tl.where(q >= threshold, q, 0.0), axis=0)
                reaches = mass >= target
                low = tl.where(reaches, middle, low)
                high = tl.where(reaches, high, middle)
        edge = low.to(tl.float32, bitcast=True)
        drawn_score = -float("inf")
        drawn = 0
        for start in range(0, vocab_size, BLOCK):
            indices = start + offsets
            x = tl.load(row_start + indices, mask=indices < vocab_size, other=-float("inf")).to(tl.float32)
            q = tl.exp((x - best) / temperature)
            uniform = tl.rand(seed, step * vocab_size + indices.to(tl.int64))
            score = tl.where(q >= edge, (x - best) / temperature - tl.log(-tl.log(uniform)), -float("inf"))
            block_score = tl.max(score, axis=0)
            block_index = start + tl.argmax(score, axis=0)
            drawn = tl.where(block_score > drawn_score, block_index, drawn)
            drawn_score = tl.maximum(drawn_score, block_score)
        chosen = drawn.to(tl.int64)
    tl.store(chosen_ptr + row, chosen)
