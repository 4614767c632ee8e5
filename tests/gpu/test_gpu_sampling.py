"""The sampling kernel compiled for the GPU, against its torch reference on the same device,
and the transformers engine's greedy answers on CUDA (kernel) against CPU (reference).
Skipped without CUDA; CI checks the same kernel source under Triton's interpreter."""

from __future__ import annotations

import asyncio

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from kernels.sampling import sample_reference, sample_triton  # noqa: E402
from server.engines.base import GenerationRequest, SamplingParams  # noqa: E402
from server.engines.options import TransformersOptions  # noqa: E402
from server.engines.transformers_engine import TransformersEngine  # noqa: E402
from benchmarks.random_model import build_random_llama  # noqa: E402

CUDA = torch.device("cuda")
VOCAB = 49152  # SmolLM2's


def _arguments(logits, temperature, top_p, seeds, steps=0):
    rows = len(seeds)
    full = lambda value: torch.full((rows,), value, device=CUDA)  # noqa: E731
    return logits, full(float(temperature)), full(float(top_p)), torch.tensor(seeds, device=CUDA), full(steps).long()


def test_greedy_rows_match_torch_on_the_device():
    torch.manual_seed(0)
    logits = torch.randn(64, VOCAB, device=CUDA) * 4
    chosen = sample_triton(*_arguments(logits, 0.0, 1.0, list(range(64))))
    assert torch.equal(chosen, logits.argmax(dim=-1))


def test_the_kernel_draws_what_the_reference_draws_on_the_device():
    """20,000 draws from one skewed row: both samplers' frequencies within 1.5 points of the
    softmax's, and no draw outside top_p's nucleus."""
    torch.manual_seed(1)
    row = torch.randn(1, 32, device=CUDA) * 2
    probs = torch.softmax(row[0] / 0.8, dim=-1)
    ordered = probs.argsort(descending=True)
    nucleus = ordered[(probs[ordered].cumsum(0) - probs[ordered]) < 0.9]
    expected = torch.zeros_like(probs)
    expected[nucleus] = probs[nucleus] / probs[nucleus].sum()
    logits = row.expand(20000, -1).contiguous()
    for sampler in (sample_triton, sample_reference):
        drawn = sampler(*_arguments(logits, 0.8, 0.9, list(range(20000))))
        frequencies = torch.bincount(drawn, minlength=32).float() / 20000
        assert frequencies[expected == 0].sum() == 0, sampler.__name__
        assert (frequencies - expected).abs().max() < 0.015, sampler.__name__


def test_a_seeded_row_draws_the_same_whatever_shares_its_batch_on_the_device():
    torch.manual_seed(2)
    row = torch.randn(1, VOCAB, device=CUDA)
    alone = sample_triton(*_arguments(row, 1.0, 0.95, [99], steps=4))
    crowd = torch.cat([torch.randn(7, VOCAB, device=CUDA), row])
    together = sample_triton(*_arguments(crowd, 1.0, 0.95, [1, 2, 3, 4, 5, 6, 7, 99], steps=4))
    assert int(together[-1]) == int(alone[0])


def test_the_engine_answers_greedily_the_same_on_cuda_and_on_cpu(tmp_path, tokenizer_source, monkeypatch):
    """SmolLM2-135M's shape with random float32 weights, 24 greedy tokens per prompt, one
    request at a time (joins change a batch's padding, and so its rounding): the CUDA
    engine with the kernel, the CUDA engine with the reference (the same logits: identical),
    and the CPU engine (the reference; float32 without TF32 on both)."""
    import kernels.sampling

    folder = build_random_llama(tmp_path / "smol", tokenizer_source, 0, "float32", "smol")
    prompts = ["Once upon a time", "The capital of France is", "def fibonacci(n):"]

    async def answers(device: str) -> list[str]:
        engine = TransformersEngine(folder, TransformersOptions(device=device, dtype="float32", max_batch_size=8))
        await engine.start()
        try:
            texts = []
            for i, prompt in enumerate(prompts):
                request = GenerationRequest(f"r{i}", engine.tokenize(prompt), SamplingParams(max_tokens=24, temperature=0))
                texts.append("".join([chunk.text async for chunk in engine.generate(request)]))
            return texts
        finally:
            await engine.stop()

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 matmuls as the CPU computes them
    with_kernel = asyncio.run(answers("cuda"))
    monkeypatch.setattr(kernels.sampling, "sample_triton", kernels.sampling.sample_reference)
    assert asyncio.run(answers("cuda")) == with_kernel
    monkeypatch.undo()
    assert asyncio.run(answers("cpu")) == with_kernel
