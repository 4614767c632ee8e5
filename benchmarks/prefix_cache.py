"""What the transformers engine's prefix cache buys a multi-turn chat: baton with it (the
default) and without (`--engine-option prefix_cache_mib=0`), same model, same conversations,
both servers up at once and measured in turn, the order reversed each round.

    .venv/bin/python benchmarks/prefix_cache.py [--model FOLDER] [--conversations 4] [--turns 6] [--rounds 2]

Each conversation has a long system prompt (about 700 tokens) and short questions, and sends
its whole history each turn, as chat clients do; the conversations run at once (greedy, 32
tokens a turn). Prints the TTFT p50 of the turns after the first, the share of their prompt
tokens the cache held (usage's `cached_tokens`), and the ratio without / with. Writes
benchmarks/results/prefix_cache.json.
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

SYSTEM = (
    "You are the help desk of a harbour museum. Visitors ask about ships, tides, lighthouses, "
    "knots and the people who worked on the docks. Answer in two sentences at most, in plain "
    "words, and say so when you do not know. "
) * 12
QUESTIONS = ["When was the lighthouse built?", "Who kept it?", "How high is it?", "What ships came here?", "Is there a tide table?", "Where can I eat?", "Is it open on Sunday?", "Thank you!"]
VARIANTS = {"with": [], "without": ["--engine-option", "prefix_cache_mib=0"]}


def main() -> None:
    args = _parse()
    model = args.model or _demo_model()
    with ExitStack() as stack:
        servers = {variant: stack.enter_context(_running(transformers_server(model, *options), f"prefix_{variant}"))[0] for variant, options in VARIANTS.items()}
        for url in servers.values():
            asyncio.run(_conversations(url, 1, 2, args.max_tokens))  # warm-up
        rounds = alternating(servers, args.rounds, lambda url, _: asyncio.run(_conversations(url, args.conversations, args.turns, args.max_tokens)))
    _report(rounds, args)


async def _conversations(url: str, num_conversations: int, num_turns: int, max_tokens: int) -> list[dict]:
    """Every turn of every conversation: its number, TTFT, prompt and cached tokens."""
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", timeout=600) as client:
        turns = await asyncio.gather(*[_conversation(client, n, num_turns, max_tokens) for n in range(num_conversations)])
    return [turn for conversation in turns for turn in conversation]


async def _conversation(client, number: int, num_turns: int, max_tokens: int) -> list[dict]:
    messages, turns = [{"role": "system", "content": f"Visitor {number}. {SYSTEM}"}], []
    for turn in range(num_turns):
        messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        started, first, text, usage = time.perf_counter(), None, "", None
        stream = await client.chat.completions.create(
            model="bench", messages=messages, max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True}
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text += chunk.choices[0].delta.content
            usage = chunk.usage or usage
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        turns.append({"turn": turn, "ttft_s": (first or time.perf_counter()) - started, "prompt_tokens": usage.prompt_tokens, "cached_tokens": cached})
        messages.append({"role": "assistant", "content": text})
    return turns


def _report(rounds: list[dict], args) -> None:
    summary = {}
    for variant in VARIANTS:
        later = [t for r in rounds for t in r[variant] if t["turn"] > 0]
        summary[variant] = {
            "ttft_p50_s": statistics.median(t["ttft_s"] for t in later),
            "cached_share": sum(t["cached_tokens"] for t in later) / sum(t["prompt_tokens"] for t in later),
            "mean_prompt_tokens": statistics.mean(t["prompt_tokens"] for t in later),
        }
        figures = summary[variant]
        print(f"{variant:>7} prefix cache: TTFT p50 {figures['ttft_p50_s'] * 1000:.0f} ms over turns 2+, {figures['cached_share']:.0%} of {figures['mean_prompt_tokens']:.0f} prompt tokens cached")
    ratio = summary["without"]["ttft_p50_s"] / summary["with"]["ttft_p50_s"]
    print(f"TTFT p50 without / with: x{ratio:.2f} ({args.conversations} conversations at once, {args.turns} turns, {args.rounds} rounds)")
    out = results_dir() / "prefix_cache.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds, "summary": summary, "ratio": ratio}, indent=2))
    print(f"wrote {out}")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a Hugging Face folder (default: the demo model)")
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    return parser.parse_args()


if __name__ == "__main__":
    main()
