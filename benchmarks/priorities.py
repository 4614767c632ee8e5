"""What priorities give interactive traffic beside a batch job on one deployment: a batch key
keeps the deployment's queue full (`--max-running-per-deployment 2`) while an app key asks
short streamed questions one after another; the app's time to first token with the batch
key's priority at 10 (served after the app's) and at 0 (first come, first served), one server
each, in turn, rounds alternating.

    .venv/bin/python benchmarks/priorities.py [--model FOLDER] [--engine transformers] [--rounds 2]

Prints the app's TTFT p50 both ways, the ratio, and the batch job's tokens/s both ways (what
it pays); writes benchmarks/results/priorities.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cpu_throughput import BIN, _demo_model, _prompts, _running  # noqa: E402
from benchmarks.serving import parse_ab_arguments, results_dir  # noqa: E402

SECRETS = {"app": "bench-app-secret", "batch": "bench-batch-secret"}
NUM_BATCH_CLIENTS = 8
NUM_APP_QUESTIONS = 8


def main() -> None:
    args = parse_ab_arguments(__doc__, rounds=2)
    os.environ.update({f"BENCH_{name.upper()}_KEY": secret for name, secret in SECRETS.items()})
    runs: dict[str, list[dict]] = {"priorities": [], "first_come": []}
    for _ in range(args.rounds):
        for variant, batch_priority in (("priorities", 10), ("first_come", 0)):
            keys = results_dir() / f"priorities_keys_{variant}.json"
            keys.write_text(json.dumps([_key("app", 0), _key("batch", batch_priority)]))
            with _running(_command(args, keys), f"priorities_{variant}") as (url, _):
                runs[variant].append(asyncio.run(_measure(url, args.max_tokens)))
    summary = {variant: {field: statistics.median(r[field] for r in results) for field in ("app_ttft_p50_s", "batch_tokens_per_s")} for variant, results in runs.items()}
    for variant, figures in summary.items():
        print(f"{variant:>10}: app TTFT p50 {figures['app_ttft_p50_s'] * 1000:.0f} ms, batch {figures['batch_tokens_per_s']:.1f} tokens/s")
    ratio = summary["first_come"]["app_ttft_p50_s"] / summary["priorities"]["app_ttft_p50_s"]
    print(f"app TTFT p50: x{ratio:.1f} sooner with priorities; batch tokens/s x{summary['priorities']['batch_tokens_per_s'] / summary['first_come']['batch_tokens_per_s']:.2f}")
    out = results_dir() / "priorities.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "summary": summary}, indent=2))
    print(f"wrote {out}")


def _key(name: str, priority: int) -> dict:
    return {"name": name, "key_env": f"BENCH_{name.upper()}_KEY", "scopes": ["inference"], "priority": priority}


def _command(args, keys: Path) -> list[str]:
    model = str(args.model or _demo_model())
    return [
        *(str(BIN / "baton"), "serve", "--model", model, "--name", "bench", "--port", "{port}", "--engine", args.engine),
        *("--keys-file", str(keys), "--max-running-per-deployment", "2", "--log-level", "warning", "--no-restore"),
    ]


async def _measure(url: str, max_tokens: int) -> dict:
    """The batch job runs throughout; the app's questions start once its queue is full."""
    clients = {name: openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0, timeout=600) for name, secret in SECRETS.items()}
    stop, batch_tokens = asyncio.Event(), []

    async def batch_client(seed: int) -> None:
        prompts = _prompts(1000, seed)
        while not stop.is_set():
            answer = await clients["batch"].chat.completions.create(model="bench", messages=[{"role": "user", "content": prompts[len(batch_tokens) % 1000]}], max_tokens=max_tokens)
            batch_tokens.append(answer.usage.completion_tokens)

    batch = [asyncio.create_task(batch_client(seed)) for seed in range(NUM_BATCH_CLIENTS)]
    started = time.perf_counter()
    await asyncio.sleep(2.0)
    ttfts = [await _first_token_seconds(clients["app"], question) for question in _prompts(NUM_APP_QUESTIONS, seed=99)]
    stop.set()
    await asyncio.gather(*batch)
    elapsed = time.perf_counter() - started
    for client in clients.values():
        await client.close()
    return {"app_ttft_p50_s": round(statistics.median(ttfts), 4), "app_ttfts_s": [round(t, 4) for t in ttfts], "batch_tokens_per_s": round(sum(batch_tokens) / elapsed, 2)}


async def _first_token_seconds(client, question: str) -> float:
    started = time.perf_counter()
    stream = await client.chat.completions.create(model="bench", messages=[{"role": "user", "content": question}], max_tokens=8, stream=True)
    first = None
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
    return first if first is not None else time.perf_counter() - started


if __name__ == "__main__":
    main()
