"""What long prompts cost the streams already running, on baton's transformers engine, with a
feature and without it, same model, both servers up at once and measured in turn, the order
reversed each round:

- `--compare chunking`: chunked prefill (the default, 512 tokens a chunk) against
  `--engine-option prefill_chunk_tokens=0`; the long prompts answer 4 tokens, so what is
  measured is their prefill;
- `--compare row-attention`: row-by-row attention where padding dominates (the default)
  against `--engine-option row_attention=false`; the long prompts answer 64 tokens, so the
  running streams decode beside a long row.

    .venv/bin/python benchmarks/long_prompts.py --compare chunking|row-attention [--model FOLDER] [--prompt-tokens 3000] [--rounds 2]

Each round, 4 streams of 160 tokens run, and meanwhile 3 long prompts (each its own, so no
prefix cache helps) arrive one after another. Prints the running streams' gap between tokens
(p50, p99, max) and their tokens/s, the long prompts' TTFT p50, for both, and the ratios.
Writes benchmarks/results/long_prompts_<compare>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cpu_throughput import _demo_model, _running  # noqa: E402
from benchmarks.serving import alternating, results_dir, transformers_server  # noqa: E402

COMPARED = {  # the variant with the feature first, then the one without; how many tokens a long prompt answers
    "chunking": ({"chunked": [], "whole": ["--engine-option", "prefill_chunk_tokens=0"]}, 4),
    "row-attention": ({"row": [], "padded": ["--engine-option", "row_attention=false"]}, 64),
}
FILLER = "The harbour museum keeps the logbooks, maps and letters of the ships that called here. "
STREAM_TOKENS = 160


def main() -> None:
    args = _parse()
    model = args.model or _demo_model()
    variants, long_tokens = COMPARED[args.compare]
    with ExitStack() as stack:
        servers = {variant: stack.enter_context(_running(transformers_server(model, *options), f"long_{variant}"))[0] for variant, options in variants.items()}
        rounds = alternating(servers, args.rounds, lambda url, index: asyncio.run(_round(url, index, args.prompt_tokens, long_tokens)))
    _report(rounds, list(variants), args)


async def _round(url: str, index: int, prompt_tokens: int, long_tokens: int) -> dict:
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600) as client:
        gaps: list[float] = []
        started = time.perf_counter()
        streams = [asyncio.create_task(_stream(client, f"Tell story {n} about the sea.", STREAM_TOKENS, gaps)) for n in range(4)]
        await asyncio.sleep(1.0)
        long_ttfts = []
        for n in range(3):  # each its own prompt: "round 0, visitor 1: ..." (about 20 words a sentence, 1.3 tokens a word)
            prompt = f"Round {index}, visitor {n}: " + FILLER * (prompt_tokens // 20)
            long_ttfts.append(await _stream(client, prompt, long_tokens, []))
        await asyncio.gather(*streams)
    return {"gaps_s": gaps, "long_ttfts_s": long_ttfts, "streams_tokens_per_s": 4 * STREAM_TOKENS / (time.perf_counter() - started)}


async def _stream(client, prompt: str, max_tokens: int, gaps: list[float]) -> float:
    """Streams a completion; appends the gaps between its chunks to `gaps`; returns its TTFT."""
    started, first, last = time.perf_counter(), None, None
    stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, extra_body={"ignore_eos": True})
    async for _ in stream:
        now = time.perf_counter()
        first = first or now
        if last is not None:
            gaps.append(now - last)
        last = now
    return (first or time.perf_counter()) - started


def _report(rounds: list[dict], variants: list[str], args) -> None:
    summary = {}
    for variant in variants:
        gaps = sorted(g for r in rounds for g in r[variant]["gaps_s"])
        summary[variant] = {
            "gap_p50_s": statistics.median(gaps),
            "gap_p99_s": gaps[int(0.99 * (len(gaps) - 1))],
            "gap_max_s": gaps[-1],
            "streams_tokens_per_s": statistics.median(r[variant]["streams_tokens_per_s"] for r in rounds),
            "long_ttft_p50_s": statistics.median(t for r in rounds for t in r[variant]["long_ttfts_s"]),
        }
        f = summary[variant]
        print(
            f"{variant:>8}: running streams' gap p50 {f['gap_p50_s'] * 1000:.0f} ms, p99 {f['gap_p99_s'] * 1000:.0f} ms, max {f['gap_max_s'] * 1000:.0f} ms, "
            f"{f['streams_tokens_per_s']:.1f} tokens/s; long prompts' TTFT p50 {f['long_ttft_p50_s']:.2f} s"
        )
    on, off = (summary[variant] for variant in variants)
    print(
        f"{variants[1]} / {variants[0]}: gap p50 x{off['gap_p50_s'] / on['gap_p50_s']:.2f}, p99 x{off['gap_p99_s'] / on['gap_p99_s']:.2f}, max x{off['gap_max_s'] / on['gap_max_s']:.2f}; "
        f"streams' tokens/s {variants[0]} / {variants[1]} x{on['streams_tokens_per_s'] / off['streams_tokens_per_s']:.2f}; long TTFT x{off['long_ttft_p50_s'] / on['long_ttft_p50_s']:.2f}"
    )
    out = results_dir() / f"long_prompts_{args.compare}.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "rounds": rounds}, indent=2))
    print(f"wrote {out}")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", choices=list(COMPARED), required=True)
    parser.add_argument("--model", type=Path, default=None, help="a Hugging Face folder (default: the demo model)")
    parser.add_argument("--prompt-tokens", type=int, default=3000, help="about how long each long prompt is")
    parser.add_argument("--rounds", type=int, default=2)
    return parser.parse_args()


if __name__ == "__main__":
    main()
