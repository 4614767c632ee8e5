"""The transformers engine on CUDA: streaming chat tokens/s and TTFT at each concurrency for
baton (static cache, CUDA graphs), baton with `cuda_graphs=false` (the eager engine as it
was before them), and vLLM's own server, same GPU, same run, same requests (greedy).

    python benchmarks/transformers_cuda.py --model FOLDER [--concurrency 1 8 32] [--max-tokens 128]

FOLDER: SmolLM2-135M's shape with random weights is what `tests/gpu/run_on_node.sh
transformers` builds (`benchmarks/random_model.py --shape smol`). Each concurrency c gets
max(8, 2c) requests. Prints each server's figures and baton's ratios to the other two;
writes benchmarks/results/transformers_cuda.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cpu_throughput import BIN, _measured, _load, _prompts, _running  # noqa: E402
from benchmarks.serving import results_dir  # noqa: E402


def main() -> None:
    args = _parse()
    prompts = _prompts(max(8, 2 * max(args.concurrency)), seed=0)
    results = {}
    for name, command in _servers(args):
        with _running(command, name) as (url, server):
            asyncio.run(_load(url, "bench", prompts[:2], args.max_tokens, concurrency=2))  # warm-up (and first graphs)
            results[name] = {str(c): _measured(server, url, "bench", prompts[: max(8, 2 * c)], args.max_tokens, c) for c in args.concurrency}
        _print(name, results[name])
    _print_ratios(results, args.concurrency)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2))
    print(f"wrote {args.out}")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a Hugging Face folder")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--skip", action="append", default=[], choices=["baton-eager", "vllm-server"], help="leave a server out; repeatable")
    parser.add_argument("--out", type=Path, default=results_dir() / "transformers_cuda.json")
    return parser.parse_args()


def _servers(args) -> list[tuple[str, list[str]]]:
    rows = str(max(args.concurrency))
    baton = [str(BIN / "baton"), "serve", "--model", str(args.model), "--name", "bench", "--port", "{port}", "--engine", "transformers", "--max-batch-size", rows, "--no-restore"]
    servers = [
        ("baton", baton),
        ("baton-eager", [*baton, "--engine-option", "cuda_graphs=false"]),
        ("vllm-server", [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.model), "--served-model-name", "bench", "--port", "{port}"]),
    ]
    return [(name, command) for name, command in servers if name not in args.skip]


def _print(name: str, by_concurrency: dict) -> None:
    for concurrency, r in by_concurrency.items():
        print(f"{name:>12} c={concurrency:<3} {r['tokens_per_s']:8.1f} tok/s  TTFT p50 {1000 * r['ttft_p50_s']:7.1f} ms  p99 {1000 * r['ttft_p99_s']:7.1f} ms  ({r['completion_tokens']} tokens)", flush=True)


def _print_ratios(results: dict, concurrencies: list[int]) -> None:
    for other in ("baton-eager", "vllm-server"):
        if {"baton", other} <= results.keys():
            ratios = ", ".join(f"c={c} x{results['baton'][str(c)]['tokens_per_s'] / results[other][str(c)]['tokens_per_s']:.2f}" for c in concurrencies)
            print(f"baton tokens/s over {other}: {ratios}")


if __name__ == "__main__":
    main()
