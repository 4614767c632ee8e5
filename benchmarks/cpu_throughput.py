"""Streaming chat throughput and TTFT: baton against an anchor server, same model, same run.

The anchor is `transformers serve` (baton on its transformers engine), or vLLM's own OpenAI
server with `--engine vllm --anchor vllm-server` (what benchmarks/overhead_vs_vllm.py runs).

    .venv/bin/python benchmarks/cpu_throughput.py [--model PATH] [--requests 16] [--max-tokens 64]

Both servers run as subprocesses on free ports and get the same requests (greedy, seeded
prompt order) at each concurrency. Prints tokens/s and TTFT p50/p99 for both and the ratio;
writes benchmarks/results/cpu_throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import openai
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serving import BIN, free_port, results_dir, wait_ready  # noqa: E402
TOPICS = ["a lighthouse keeper", "a lost robot", "a mountain village", "an old clock", "a brave fox", "the sea", "a library", "a comet"]


def main() -> None:
    args = _parse()
    model = args.model or _demo_model()
    prompts = _prompts(args.requests, seed=args.seed)
    servers = _servers(model, args)
    rounds = _side_by_side(servers, prompts, args) if args.rounds > 1 else [_one_after_another(servers, prompts, args)]
    _report(rounds, args)


def _one_after_another(servers, prompts: list[str], args) -> dict:
    """One server at a time, each with the machine to itself: {server: {concurrency: figures}}."""
    results = {}
    for name, command, served_as in servers:
        with _running(command, name) as (url, process):
            _warm_up(url, served_as, prompts, args)
            results[name] = {str(c): _measured(process, url, served_as, prompts, args.max_tokens, c) for c in args.concurrency}
    return results


def _side_by_side(servers, prompts: list[str], args) -> list[dict]:
    """Every server up at once, measured in turn, `args.rounds` times, the order reversed
    each round: a machine whose speed drifts (these do, by 10 to 30% between runs) moves
    both sides of each round's ratio alike. The anchor starts first, so that on a GPU baton
    plans its engine from the memory the anchor left (`ANCHOR_GPU_SHARE`)."""
    with ExitStack() as stack:
        running = {}
        for name, command, served_as in reversed(servers):
            running[name] = (*stack.enter_context(_running(command, name)), served_as)
        for url, _, served_as in running.values():
            _warm_up(url, served_as, prompts, args)
        rounds = []
        for index in range(args.rounds):
            order = list(running) if index % 2 == 0 else list(reversed(running))
            rounds.append({name: {} for name in running})
            for concurrency in args.concurrency:
                for name in order:
                    url, process, served_as = running[name]
                    rounds[-1][name][str(concurrency)] = _measured(process, url, served_as, prompts, args.max_tokens, concurrency)
        return rounds


def _warm_up(url: str, served_as: str, prompts: list[str], args) -> None:
    asyncio.run(_load(url, served_as, prompts[:2], args.max_tokens, concurrency=2))


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a Hugging Face folder (default: the bundled demo model)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm"], help="baton's engine")
    parser.add_argument("--anchor", default="transformers-serve", choices=["transformers-serve", "vllm-server"])
    parser.add_argument("--anchor-arg", action="append", default=[], help="an extra argument for the anchor's command line; repeatable")
    parser.add_argument("--baton-arg", action="append", default=[], help="an extra argument for baton's command line (--baton-arg=--no-standby); repeatable")
    parser.add_argument("--only", choices=["baton", "transformers-serve", "vllm-server"], help="run one server only")
    parser.add_argument(
        "--rounds", type=int, default=1, help="above 1: both servers up at once, measured in turn this many times; the median of each round's ratios"
    )
    parser.add_argument("--out", type=Path, default=results_dir() / "cpu_throughput.json")
    return parser.parse_args()


def _demo_model() -> Path:
    from models.demo import ensure_demo_model
    from models.registry import Registry
    from server.config.settings import default_home

    return ensure_demo_model(Registry(Path(os.environ.get("BATON_HOME") or default_home()))).path


def _prompts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"Write a long, detailed story about {rng.choice(TOPICS)}." for _ in range(count)]


def _servers(model: Path, args) -> list[tuple[str, list[str], str]]:
    """(name, command, the `model` field it serves): baton on the chosen engine, then the anchor.
    transformers serve preloads the model given on its command line and answers to that path;
    vLLM's own server runs with the settings baton's vLLM engine uses on CPU, else both on
    vLLM's defaults (max_num_seqs included)."""
    baton = [str(BIN / "baton"), "serve", "--model", str(model), "--name", "bench", "--port", "{port}", "--engine", args.engine, "--no-restore", *args.baton_arg]
    anchors = {
        "transformers-serve": [str(BIN / "transformers"), "serve", str(model), "--port", "{port}", "--device", "cpu"],
        "vllm-server": [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name", "bench",
            "--port", "{port}", *_vllm_anchor_settings(side_by_side=args.rounds > 1),
        ],
    }
    anchors = {name: [*command, *args.anchor_arg] for name, command in anchors.items()}
    served_as = {"transformers-serve": str(model), "vllm-server": "bench"}
    servers = [("baton", baton, "bench"), (args.anchor, anchors[args.anchor], served_as[args.anchor])]
    return [s for s in servers if args.only in (None, s[0])]


ANCHOR_GPU_SHARE = "0.45"  # side by side on one GPU: vLLM's server takes this, baton plans from the rest


def _vllm_anchor_settings(side_by_side: bool) -> list[str]:
    """What baton's vLLM engine does on CPU (float32, eager); on GPU vLLM's defaults, but
    for the memory share when both servers share the device (KV cache room only: far more
    than these loads use, on both sides)."""
    import torch

    if not torch.cuda.is_available():
        return ["--dtype", "float32", "--enforce-eager"]
    return ["--gpu-memory-utilization", ANCHOR_GPU_SHARE] if side_by_side else []


@contextmanager
def _running(command: list[str], name: str):
    port = free_port()
    log = open(results_dir() / f"{name}.log", "w")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    process = subprocess.Popen([part.format(port=port) for part in command], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        yield url, psutil.Process(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()





def _measured(server: psutil.Process, url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    """The load's figures, plus the CPU time of the server's own process per token: with vLLM
    the model runs in child processes, so this is the front end's cost (HTTP, SSE, routing),
    a figure the machine's noise barely moves."""
    before, front_before = server.cpu_times(), _front_end_totals(url)
    result = asyncio.run(_load(url, model, prompts, max_tokens, concurrency))
    after, front_after = server.cpu_times(), _front_end_totals(url)
    cpu_s = (after.user + after.system) - (before.user + before.system)
    return {**result, "main_process_cpu_ms_per_token": round(1000 * cpu_s / max(result["completion_tokens"], 1), 2), **_front_end_means(front_before, front_after)}


FRONT_END_STAGES = {"baton_queue_wait_seconds": "queue_ms", "baton_prepare_seconds": "prepare_ms"}


def _front_end_totals(url: str) -> dict[str, tuple[float, float]]:
    """baton's own histograms of the time before the engine (sum, count), from /metrics; none
    from a server that has no such series (the anchor)."""
    from prometheus_client.parser import text_string_to_metric_families

    answer = httpx.get(f"{url}/metrics", timeout=30)
    if answer.status_code != 200 or "baton_" not in answer.text:
        return {}
    totals = {}
    for family in text_string_to_metric_families(answer.text):
        if family.name in FRONT_END_STAGES:
            sums = sum(s.value for s in family.samples if s.name.endswith("_sum"))
            counts = sum(s.value for s in family.samples if s.name.endswith("_count"))
            totals[family.name] = (sums, counts)
    return totals


def _front_end_means(before: dict, after: dict) -> dict:
    """Milliseconds per request in each stage before the engine, over one load: where a TTFT
    gap to the anchor is spent in baton's front end, and where it is not."""
    means = {}
    for name, key in FRONT_END_STAGES.items():
        if name in after:
            (sum_before, count_before), (sum_after, count_after) = before.get(name, (0.0, 0.0)), after[name]
            means[key] = round(1000 * (sum_after - sum_before) / max(count_after - count_before, 1), 2)
    return means


async def _load(url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int, extra: dict | None = None) -> dict:
    """Streaming chat requests, `concurrency` at a time; `extra` fields go into every request."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)

    async def one(prompt: str) -> tuple[float, int]:
        async with gate:
            return await _stream_one(client, model, prompt, max_tokens, extra or {})

    started = time.perf_counter()
    measured = await asyncio.gather(*[one(p) for p in prompts])
    elapsed = time.perf_counter() - started
    await client.close()
    ttfts = sorted(ttft for ttft, _ in measured)
    num_tokens = sum(n for _, n in measured)
    return {
        "requests": len(prompts),
        "completion_tokens": num_tokens,
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(num_tokens / elapsed, 2),
        "ttft_p50_s": round(statistics.median(ttfts), 4),
        "ttft_p99_s": round(_percentile(ttfts, 0.99), 4),
    }


async def _stream_one(client, model: str, prompt: str, max_tokens: int, extra: dict) -> tuple[float, int]:
    started = time.perf_counter()
    ttft, num_chunks = None, 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0, stream=True, **extra
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft or time.perf_counter() - started
            num_chunks += 1
    return ttft or time.perf_counter() - started, num_chunks


def _percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def _report(rounds: list[dict], args) -> None:
    """Each round's figures and ratios; over several rounds, the median of each ratio."""
    ratios = []
    for index, results in enumerate(rounds):
        if len(rounds) > 1:
            print(f"round {index + 1} of {len(rounds)}")
        for name, by_concurrency in results.items():
            for concurrency, r in by_concurrency.items():
                front_end = f", before the engine: queue {r['queue_ms']:.1f} ms + prepare {r['prepare_ms']:.1f} ms mean" if "prepare_ms" in r else ""
                print(
                    f"{name:>20} c={concurrency:<2} {r['tokens_per_s']:7.1f} tok/s  "
                    f"TTFT p50 {r['ttft_p50_s']:6.3f}s p99 {r['ttft_p99_s']:6.3f}s  ({r['completion_tokens']} tokens, "
                    f"server process {r['main_process_cpu_ms_per_token']:.2f} CPU ms/token{front_end})"
                )
        if {"baton", args.anchor} <= results.keys():
            ratios.append({c: _ratios(results["baton"][c], results[args.anchor][c]) for c in map(str, args.concurrency)})
            for concurrency, ratio in ratios[-1].items():
                print(f"ratio c={concurrency}: {_describe(ratio)} (baton on {args.engine} / {args.anchor})")
    medians = {c: {k: statistics.median(r[c][k] for r in ratios) for k in ratios[0][c]} for c in ratios[0]} if len(ratios) > 1 else {}
    for concurrency, ratio in medians.items():
        print(f"median of {len(ratios)} rounds, c={concurrency}: {_describe(ratio)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds, "ratios": ratios, "median_ratios": medians}
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


def _ratios(ours: dict, anchor: dict) -> dict:
    return {
        "tokens_per_s": ours["tokens_per_s"] / anchor["tokens_per_s"],
        "ttft_p50": ours["ttft_p50_s"] / anchor["ttft_p50_s"],
        "ttft_p50_ms_more": 1000 * (ours["ttft_p50_s"] - anchor["ttft_p50_s"]),
        "cpu_per_token": ours["main_process_cpu_ms_per_token"] / max(anchor["main_process_cpu_ms_per_token"], 1e-9),
    }


def _describe(ratio: dict) -> str:
    return (
        f"tokens/s x{ratio['tokens_per_s']:.2f}, TTFT p50 x{ratio['ttft_p50']:.2f}, TTFT p50 {ratio['ttft_p50_ms_more']:+.0f} ms, "
        f"server-process CPU per token x{ratio['cpu_per_token']:.2f}"
    )


if __name__ == "__main__":
    main()
