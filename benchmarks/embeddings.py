"""Embeddings: baton's /v1/embeddings against vLLM's own server on its pooling runner, same
model, same load, same run (both up at once, measured in turn, the order reversed each
round; the median of the rounds' ratios is the figure). Target: inputs/s at least 0.97x
vLLM's. It also checks that both servers make the same vectors (cosine similarity).

    .venv/bin/python benchmarks/embeddings.py [--model PATH] [--engine vllm|transformers]
        [--requests 32] [--inputs 8] [--concurrency 4] [--rounds 3]

baton serves with `--engine-option runner=pooling` on vLLM (the transformers engine embeds
with any version); vLLM's server runs `--runner pooling` with the settings baton's vLLM
engine uses on CPU (float32, eager).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cpu_throughput import BIN, _demo_model, _prompts, _running, _vllm_anchor_settings  # noqa: E402
from benchmarks.serving import results_dir  # noqa: E402


def main() -> None:
    args = _parse()
    model = args.model or _demo_model()
    servers = {
        "baton": [str(BIN / "baton"), "serve", "--model", str(model), "--name", "bench", "--port", "{port}", "--engine", args.engine, "--log-level", "warning", "--no-restore"]
        + (["--engine-option", "runner=pooling"] if args.engine == "vllm" else []),
        "vllm-server": [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name", "bench", "--port", "{port}", "--runner", "pooling", *_vllm_anchor_settings(side_by_side=True)],
    }
    batches = [_prompts(args.inputs, seed) for seed in range(args.requests)]
    rounds = []
    with ExitStack() as stack:
        urls = {name: stack.enter_context(_running(command, f"embeddings_{name}"))[0] for name, command in servers.items()}
        agreement = _agreement(urls, batches[0])
        for name, url in urls.items():  # warm-up: first requests pay for lazy set-up on both sides
            asyncio.run(_load(url, batches[:4], args.concurrency))
        for index in range(args.rounds):
            order = list(urls) if index % 2 == 0 else list(reversed(urls))
            rounds.append({name: asyncio.run(_load(urls[name], batches, args.concurrency)) for name in order})
    _report(rounds, agreement, args)


def _agreement(urls: dict[str, str], texts: list[str]) -> float:
    """The lowest cosine similarity between the two servers' vectors for the same inputs."""
    vectors = {name: [item["embedding"] for item in _embed(url, texts)["data"]] for name, url in urls.items()}
    return min(_cosine(a, b) for a, b in zip(*vectors.values(), strict=True))


def _embed(url: str, texts: list[str]) -> dict:
    answer = httpx.post(f"{url}/v1/embeddings", json={"model": "bench", "input": texts, "encoding_format": "float"}, timeout=600)
    answer.raise_for_status()
    return answer.json()


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


async def _load(url: str, batches: list[list[str]], concurrency: int) -> dict:
    """Every batch as one request, `concurrency` at a time: inputs/s and latency per request."""
    gate, latencies = asyncio.Semaphore(concurrency), []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one(texts: list[str]) -> None:
            async with gate:
                started = time.perf_counter()
                answer = await client.post("/v1/embeddings", json={"model": "bench", "input": texts, "encoding_format": "float"})
                answer.raise_for_status()
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(one(texts) for texts in batches))
        elapsed = time.perf_counter() - started
    return {"inputs_per_s": sum(map(len, batches)) / elapsed, "latency_p50_s": statistics.median(latencies), "elapsed_s": elapsed}


def _report(rounds: list[dict], agreement: float, args) -> None:
    ratios = [r["baton"]["inputs_per_s"] / r["vllm-server"]["inputs_per_s"] for r in rounds]
    ratio = statistics.median(ratios)
    for index, r in enumerate(rounds):
        row = ", ".join(f"{name} {m['inputs_per_s']:.1f} inputs/s (p50 {m['latency_p50_s'] * 1000:.0f} ms)" for name, m in r.items())
        print(f"round {index + 1}: {row}; ratio x{ratios[index]:.2f}")
    verdict = "meets" if ratio >= 0.97 else "misses"
    print(f"baton on {args.engine} / vLLM's server: x{ratio:.2f} inputs/s (median of {len(rounds)} rounds; {verdict} the 0.97 target); lowest cosine similarity of their vectors {agreement:.5f}")
    out = results_dir() / "embeddings.json"
    out.write_text(json.dumps({"engine": args.engine, "rounds": rounds, "ratio": ratio, "agreement": agreement}, indent=2))
    print(f"written to {out}")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a Hugging Face folder (default: the demo model)")
    parser.add_argument("--engine", default="vllm", choices=["vllm", "transformers"])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--inputs", type=int, default=8, help="inputs per request")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args()


if __name__ == "__main__":
    main()
