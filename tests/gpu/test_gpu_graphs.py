"""The transformers engine's decode steps as CUDA graphs over a static cache: the same greedy
answers as its eager padded path, and a crowd of requests joining and leaving served whole.
Skipped without CUDA; CI checks the static cache's layout on CPU (tests/unit/test_static_rows.py)."""

from __future__ import annotations

import asyncio

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from benchmarks.random_model import build_random_llama  # noqa: E402
from server.engines.base import GenerationRequest, SamplingParams  # noqa: E402
from server.engines.options import TransformersOptions  # noqa: E402
from server.engines.transformers_engine import TransformersEngine  # noqa: E402


@pytest.fixture(scope="module")
def smol_float32(tmp_path_factory, tokenizer_source):
    return build_random_llama(tmp_path_factory.mktemp("graphs") / "smol", tokenizer_source, 0, "float32", "smol")


async def _text(engine, request_id: str, prompt: str, sampling: SamplingParams) -> tuple[str, str | None]:
    request = GenerationRequest(request_id, engine.tokenize(prompt), sampling)
    chunks = [chunk async for chunk in engine.generate(request)]
    return "".join(c.text for c in chunks), chunks[-1].finish_reason


def test_graphed_steps_answer_as_the_eager_engine(smol_float32):
    """One request at a time, 300 greedy tokens (past the first window of 256 columns, so a
    graph of the next window is captured mid-answer): graphs on and off give the same text."""
    prompts = ["Once upon a time", "The capital of France is", "def fibonacci(n):"]

    async def answers(cuda_graphs: bool) -> tuple[list[str], str]:
        engine = TransformersEngine(smol_float32, TransformersOptions(device="cuda", dtype="float32", cuda_graphs=cuda_graphs))
        await engine.start()
        try:
            texts = [(await _text(engine, f"r{i}", p, SamplingParams(max_tokens=300, temperature=0)))[0] for i, p in enumerate(prompts)]
            return texts, engine.health().details["decode"]
        finally:
            await engine.stop()

    torch.backends.cuda.matmul.allow_tf32 = False
    graphed, decode = asyncio.run(answers(True))
    print(f"\ndecode: {decode}")
    assert decode == "CUDA graphs (6 captured), static cache of 1024 columns"  # 5 batch sizes at load, then (1, 512)
    eager, decode = asyncio.run(answers(False))
    assert decode.startswith("eager steps, padded")
    assert graphed == eager


def test_a_crowd_joining_and_leaving_graphed_steps_is_served_whole(smol_float32):
    """40 sampled requests of 8 to 200 tokens through 8 rows: every one ends with its
    tokens, and several batch sizes were captured."""

    async def crowd() -> tuple[list[tuple[str, str | None]], str]:
        engine = TransformersEngine(smol_float32, TransformersOptions(device="cuda", dtype="bfloat16", max_batch_size=8))
        await engine.start()
        try:
            requests = [
                _text(engine, f"c{i}", f"Story number {i}:", SamplingParams(max_tokens=8 + (i * 37) % 193, temperature=0.8, seed=i))
                for i in range(40)
            ]
            return await asyncio.gather(*requests), engine.health().details["decode"]
        finally:
            await engine.stop()

    results, decode = asyncio.run(crowd())
    print(f"\ndecode: {decode}")
    assert all(reason in ("length", "stop") for _, reason in results)
    assert sum(reason == "length" for _, reason in results) >= 30  # random weights rarely say EOS
    assert int(decode.split("(")[1].split()[0]) >= 3


def test_prefix_hits_and_chunked_prefills_answer_as_whole_prefills_over_graphed_steps(smol_float32):
    """Turns that share a long system prompt (prefix cache hits), then a long prompt that
    arrives while a stream runs (prefilled 64 tokens at a time): the same greedy answers as an
    engine that prefills every prompt whole, and the static cache takes both kinds of rows."""
    system = "You are a helpful assistant who answers briefly and kindly. " * 20
    turns = [system + question for question in ("What is the sea?", "What is a lake?", "What is a river?")]
    long = "The harbour keeps the logbooks of every ship that called here. " * 150

    async def answers(options: dict) -> tuple[list[str], dict]:
        engine = TransformersEngine(smol_float32, TransformersOptions(**{"device": "cuda", "dtype": "float32", "prefill_chunk_tokens": 64, **options}))
        await engine.start()
        try:
            greedy = SamplingParams(max_tokens=40, temperature=0)
            texts = [(await _text(engine, f"turn{i}", turn, greedy))[0] for i, turn in enumerate(turns)]
            running = asyncio.ensure_future(_text(engine, "running", "Once upon a time", SamplingParams(max_tokens=300, temperature=0)))
            await asyncio.sleep(0.05)
            texts.append((await _text(engine, "long", long, greedy))[0])
            texts.append((await running)[0])
            return texts, engine.health().details
        finally:
            await engine.stop()

    torch.backends.cuda.matmul.allow_tf32 = False
    reused, details = asyncio.run(answers({}))
    print(f"\nprefix cache: {details['prefix_cache']}; chunked prefills: {details['num_chunked_prefills']}")
    whole, _ = asyncio.run(answers({"prefix_cache_mib": 0, "prefill_chunk_tokens": 0}))
    assert reused == whole
    assert details["num_chunked_prefills"] == 1 and not details["prefix_cache"].endswith(" 0 prompt tokens reused")
