"""What speculative decoding by prompt lookup (vLLM's `ngram`, the `speculative_config` engine
option) gives: the same greedy requests whose answers copy their prompt (code to repeat with a
name changed), against two `baton serve` on the vLLM engine, one with the option, both up at
once and measured in turn, rounds alternating.

    .venv/bin/python benchmarks/speculative.py [--model FOLDER] [--concurrency 1] [--requests 8] [--max-tokens 128] [--rounds 3]

Tokens are counted from each answer's usage (one chunk may carry several accepted tokens).
Prints tokens/s of each and the median ratio of the rounds; writes
benchmarks/results/speculative.json. The answers of the two must be the same text (greedy).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cpu_throughput import BIN, _demo_model, _running  # noqa: E402
from benchmarks.serving import parse_ab_arguments, results_dir  # noqa: E402

LOOKUP = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4}
# Commands are format strings ({port}): the option's JSON braces are doubled.
VARIANTS = {"plain": [], "ngram": ["--engine-option", "speculative_config=" + json.dumps(LOOKUP).replace("{", "{{").replace("}", "}}")]}


def main() -> None:
    args = parse_ab_arguments(__doc__, rounds=3)
    prompts = _prompts(args.requests, seed=0)
    model = str(args.model or _demo_model())
    runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    answers: dict[str, list[str]] = {}
    with ExitStack() as stack:
        urls = {variant: stack.enter_context(_running(_command(model, extra), f"speculative_{variant}"))[0] for variant, extra in VARIANTS.items()}
        for url in urls.values():  # warm-up
            asyncio.run(_load(url, prompts[:2], 8, 2))
        for _ in range(args.rounds):
            for variant, url in urls.items():
                result, answers[variant] = asyncio.run(_load(url, prompts, args.max_tokens, args.concurrency))
                runs[variant].append(result)
    ratios = [ngram["tokens_per_s"] / plain["tokens_per_s"] for plain, ngram in zip(runs["plain"], runs["ngram"])]
    for variant, results in runs.items():
        print(f"{variant:>6}: {statistics.median(r['tokens_per_s'] for r in results):.1f} tokens/s (median of {args.rounds}, c={args.concurrency})")
    print(f"ngram / plain: tokens/s x{statistics.median(ratios):.2f} (rounds: {', '.join(f'x{r:.2f}' for r in ratios)}); same answers: {answers['plain'] == answers['ngram']}")
    out = results_dir() / "speculative.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "ratios": ratios, "same_answers": answers["plain"] == answers["ngram"]}, indent=2))
    print(f"wrote {out}")


def _command(model: str, extra: list[str]) -> list[str]:
    return [str(BIN / "baton"), "serve", "--model", model, "--name", "bench", "--port", "{port}", "--engine", "vllm", "--log-level", "warning", "--no-restore", *extra]


def _prompts(count: int, seed: int) -> list[str]:
    """Code to repeat with one name changed: the answer is mostly its prompt."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        names = rng.sample(["total", "count", "items", "value", "index", "price", "weight", "score"], 3)
        code = "\n".join(
            [
                f"def update_{names[0]}({names[1]}, {names[2]}):",
                f"    {names[0]} = 0",
                f"    for entry in {names[1]}:",
                f"        {names[0]} += entry * {names[2]}",
                f"    return {names[0]}",
            ]
        )
        prompts.append(f"Repeat this code exactly, with `{names[0]}` renamed to `result`:\n\n```python\n{code}\n```")
    return prompts


async def _load(url: str, prompts: list[str], max_tokens: int, concurrency: int) -> tuple[dict, list[str]]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> tuple[str, int]:
        async with gate:
            answer = await client.chat.completions.create(model="bench", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0)
            return answer.choices[0].message.content, answer.usage.completion_tokens

    started = time.perf_counter()
    measured = await asyncio.gather(*[one(prompt) for prompt in prompts])
    elapsed = time.perf_counter() - started
    await client.close()
    num_tokens = sum(n for _, n in measured)
    return {"completion_tokens": num_tokens, "seconds": round(elapsed, 2), "tokens_per_s": round(num_tokens / elapsed, 2)}, [text for text, _ in measured]


if __name__ == "__main__":
    main()
