"""The Triton sampling kernel against its torch reference, run by Triton's interpreter on CPU
(the same kernel source a GPU compiles; tests/gpu runs it on the device).

Every draw uses fixed seeds, so each test's outcome is fixed: the chi-square thresholds are
the 0.1% critical values, which a sampler off by a few points of probability exceeds many
times over (a uniform draw over the same four tokens scores about 180 at 600 draws)."""

from __future__ import annotations

import pytest
import torch

from kernels.sampling import sample_reference
from tests.kernel_interpreter import InterpretedKernel

pytest.importorskip("triton")

CHI_SQUARE_999 = {2: 13.82, 3: 16.27}  # degrees of freedom -> 0.1% critical value
PROBS = torch.tensor([0.4, 0.3, 0.2, 0.1])


@pytest.fixture(scope="module")
def kernel():
    interpreted = InterpretedKernel()
    yield interpreted
    interpreted.close()


def _batch(logits: torch.Tensor, temperature: float, top_p: float, seeds, steps=None):
    rows = len(seeds)
    return (
        logits.expand(rows, -1).contiguous(),
        torch.full((rows,), temperature),
        torch.full((rows,), top_p),
        torch.tensor(seeds, dtype=torch.int64),
        torch.zeros(rows, dtype=torch.int64) if steps is None else torch.tensor(steps, dtype=torch.int64),
    )


def _chi_square(drawn: torch.Tensor, expected: torch.Tensor) -> float:
    counts = torch.bincount(drawn, minlength=len(expected)).double()
    expected_counts = expected.double() * len(drawn)
    assert counts[expected == 0].sum() == 0, "a token of probability 0 was drawn"
    kept = expected > 0
    return float(((counts[kept] - expected_counts[kept]) ** 2 / expected_counts[kept]).sum())


@pytest.mark.parametrize("sampler", ["kernel", "reference"])
def test_greedy_rows_take_the_first_argmax(sampler, kernel):
    draw = kernel if sampler == "kernel" else sample_reference
    logits = torch.tensor([[0.1, 3.0, 3.0, -1.0], [5.0, 1.0, 2.0, 5.0], [-2.0, -1.0, -3.0, -1.5]])
    chosen = draw(logits, torch.zeros(3), torch.tensor([1.0, 0.5, 0.1]), torch.arange(3), torch.zeros(3, dtype=torch.int64))
    assert chosen.tolist() == [1, 0, 1] == logits.argmax(dim=-1).tolist()


def test_greedy_matches_torch_over_a_real_vocabulary_in_several_blocks(kernel):
    torch.manual_seed(0)
    logits = torch.randn(3, 49152) * 4  # SmolLM2's vocabulary: 12 blocks of 4096
    greedy = kernel(logits, torch.zeros(3), torch.ones(3), torch.arange(3), torch.zeros(3, dtype=torch.int64))
    assert greedy.tolist() == logits.argmax(dim=-1).tolist()


def test_a_seeded_row_draws_the_same_whatever_shares_its_batch(kernel):
    torch.manual_seed(1)
    row = torch.randn(1, 300)
    others = torch.randn(4, 300) * 3
    alone = kernel(*_batch(row, 0.9, 0.95, [1234]))
    logits = torch.cat([others[:2], row, others[2:]])
    temperatures, top_ps = torch.tensor([0.0, 1.5, 0.9, 0.7, 1.0]), torch.tensor([1.0, 0.5, 0.95, 1.0, 0.2])
    seeds, steps = torch.tensor([7, 8, 1234, 9, 10]), torch.tensor([3, 0, 0, 5, 1])
    assert int(kernel(logits, temperatures, top_ps, seeds, steps)[2]) == int(alone[0])
    # and the seed and the step both matter: other seeds and steps draw other tokens
    assert len(set(kernel(*_batch(row, 0.9, 0.95, list(range(12)))).tolist())) > 1
    assert len(set(kernel(*_batch(row, 0.9, 0.95, [1234] * 12, steps=list(range(12)))).tolist())) > 1


def test_the_kernel_draws_from_the_softmax(kernel):
    drawn = kernel(*_batch(PROBS.log(), 1.0, 1.0, list(range(600))))
    assert _chi_square(drawn, PROBS) < CHI_SQUARE_999[3]


def test_the_reference_draws_from_the_softmax():
    drawn = sample_reference(*_batch(PROBS.log(), 1.0, 1.0, list(range(4000))))
    assert _chi_square(drawn, PROBS) < CHI_SQUARE_999[3]


@pytest.mark.parametrize("sampler", ["kernel", "reference"])
def test_temperature_and_top_p_shape_the_draws(sampler, kernel):
    """Temperature 0.5 sharpens [.4 .3 .2 .1] to squared weights [.53 .30 .13 .03]; top_p 0.9
    then keeps the three most likely (the mass before the fourth is 0.97 > 0.9). Drawn
    without the temperature, the three would come 4:3:2: a chi-square above 20."""
    draw = kernel if sampler == "kernel" else sample_reference
    sharpened = PROBS**2 / (PROBS**2).sum()
    assert float(sharpened[:2].sum()) < 0.9 < float(sharpened[:3].sum())
    expected = torch.cat([sharpened[:3] / sharpened[:3].sum(), torch.zeros(1)])
    drawn = draw(*_batch(PROBS.log(), 0.5, 0.9, list(range(400))))
    assert _chi_square(drawn, expected) < CHI_SQUARE_999[2]


@pytest.mark.parametrize("sampler", ["kernel", "reference"])
def test_top_p_never_leaves_the_nucleus(sampler, kernel):
    draw = kernel if sampler == "kernel" else sample_reference
    torch.manual_seed(2)
    logits = torch.randn(1, 64) * 2
    probs = torch.softmax(logits[0], dim=-1)
    ordered = probs.argsort(descending=True)
    mass_before = probs[ordered].cumsum(0) - probs[ordered]
    nucleus = set(ordered[mass_before < 0.6].tolist())
    drawn = set(draw(*_batch(logits, 1.0, 0.6, list(range(150)))).tolist())
    assert drawn <= nucleus and len(drawn) > 1


@pytest.mark.parametrize("sampler", ["kernel", "reference"])
def test_a_tiny_top_p_keeps_the_most_likely_token(sampler, kernel):
    draw = kernel if sampler == "kernel" else sample_reference
    logits = torch.tensor([[1.0, 5.0, 2.0, 4.9]])
    assert set(draw(*_batch(logits, 1.0, 1e-6, list(range(20)))).tolist()) == {1}


def test_the_kernel_and_the_reference_agree_on_distribution(kernel):
    """Both samplers over the same skewed 6-token row, temperature 0.7, top_p 0.9: a
    two-sample chi-square on their counts."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -1.0, -3.0]])
    batch = _batch(logits, 0.7, 0.9, list(range(300)))
    counts = torch.stack([torch.bincount(s(*batch), minlength=6) for s in (kernel, sample_reference)]).double()
    counts = counts[:, counts.sum(0) > 0]
    expected = counts.sum(1, keepdim=True) * counts.sum(0, keepdim=True) / counts.sum()
    statistic = float(((counts - expected) ** 2 / expected).sum())
    assert statistic < {2: 13.82, 3: 16.27, 4: 18.47}[counts.shape[1] - 1]


@pytest.mark.parametrize("scale", [0.5, 5.0])  # a flat row (the nucleus is most of it) and a peaked one
def test_the_references_nucleus_shortcut_keeps_what_a_full_sort_keeps(scale):
    from kernels.sampling import NUCLEUS_CANDIDATES, _nucleus_mask

    torch.manual_seed(3)
    probs = torch.softmax(torch.randn(3, 8 * NUCLEUS_CANDIDATES) * scale, dim=-1)
    top_ps = torch.tensor([0.5, 0.9, 0.99])
    ordered = probs.sort(dim=-1, descending=True).values
    mass_before = ordered.cumsum(dim=-1) - ordered
    edge = torch.where(mass_before < top_ps[:, None], ordered, torch.inf).min(dim=-1, keepdim=True).values
    assert torch.equal(_nucleus_mask(probs, top_ps), probs >= edge)
