"""What per-request metrics (and their log line and health outcome) cost: baton with them and
without (`--no-request-metrics`), same model, same load, alternating in one run.

    .venv/bin/python benchmarks/metrics_overhead.py [--model FOLDER] [--engine transformers] [--rounds 4]

Prints tokens/s and the server process's own CPU time per token for each, and the ratios.
Target: metrics cost no more than 2% of tokens/s at concurrency 8. The CPU per token is the
steadier figure on a noisy machine: the request path's work shows there first.
Writes benchmarks/results/metrics_overhead.json.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cpu_throughput import BIN, _demo_model, _load, _measured, _prompts, _running  # noqa: E402
from benchmarks.serving import parse_ab_arguments, results_dir  # noqa: E402

import asyncio  # noqa: E402


def main() -> None:
    args = parse_ab_arguments(__doc__, rounds=4)
    model = args.model or _demo_model()
    prompts = _prompts(args.requests, seed=0)
    runs: dict[str, list[dict]] = {"with": [], "without": []}
    for _ in range(args.rounds):
        for variant in runs:
            command = [str(BIN / "baton"), "serve", "--model", str(model), "--name", "bench", "--port", "{port}", "--engine", args.engine, "--log-level", "warning", "--no-restore"]
            command += ["--no-request-metrics"] if variant == "without" else []
            with _running(command, f"metrics_{variant}") as (url, server):
                asyncio.run(_load(url, "bench", prompts[:2], args.max_tokens, concurrency=2))  # warm-up
                runs[variant].append(_measured(server, url, "bench", prompts, args.max_tokens, args.concurrency))
    summary = {variant: _median(results) for variant, results in runs.items()}
    for variant, figures in summary.items():
        print(f"{variant:>8} metrics: {figures['tokens_per_s']:.1f} tokens/s, server CPU {figures['main_process_cpu_ms_per_token']:.3f} ms/token (c={args.concurrency})")
    tokens_ratio = summary["with"]["tokens_per_s"] / summary["without"]["tokens_per_s"]
    cpu_ratio = summary["with"]["main_process_cpu_ms_per_token"] / summary["without"]["main_process_cpu_ms_per_token"]
    print(f"with / without: tokens/s x{tokens_ratio:.3f} (target >= 0.98), server CPU per token x{cpu_ratio:.3f}")
    out = results_dir() / "metrics_overhead.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "summary": summary}, indent=2))
    print(f"wrote {out}")


def _median(results: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in results) for key in ("tokens_per_s", "main_process_cpu_ms_per_token")}


if __name__ == "__main__":
    main()
