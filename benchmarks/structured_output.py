"""What structured output costs: the same streaming chat load, plain and constrained to a
JSON schema, against one `baton serve`, alternating in one run.

    .venv/bin/python benchmarks/structured_output.py [--model FOLDER] [--engine transformers] [--rounds 3]

Target: JSON-schema answers at no less than 0.8x the tokens/s of plain ones at concurrency 8,
same engine and model. Tokens are counted as streamed content chunks for both. Writes
benchmarks/results/structured_output.json.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cpu_throughput import BIN, _demo_model, _load, _prompts, _running  # noqa: E402
from benchmarks.serving import parse_ab_arguments, results_dir  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "mood": {"type": "string", "enum": ["happy", "sad", "strange"]},
        "characters": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}},
    },
    "required": ["title", "mood", "characters"],
}
VARIANTS = {"plain": {}, "json_schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA}}}}


def main() -> None:
    args = parse_ab_arguments(__doc__, rounds=3)
    prompts = _prompts(args.requests, seed=0)
    command = [str(BIN / "baton"), "serve", "--model", str(args.model or _demo_model()), "--name", "bench", "--port", "{port}", "--engine", args.engine, "--log-level", "warning", "--no-restore"]
    runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    with _running(command, "structured_output") as (url, _):
        for variant, extra in VARIANTS.items():  # warm-up: the first grammar compiles here
            asyncio.run(_load(url, "bench", prompts[:2], 8, 2, extra))
        for _ in range(args.rounds):
            for variant, extra in VARIANTS.items():
                runs[variant].append(asyncio.run(_load(url, "bench", prompts, args.max_tokens, args.concurrency, extra)))
    summary = {variant: statistics.median(r["tokens_per_s"] for r in results) for variant, results in runs.items()}
    for variant, tokens_per_s in summary.items():
        print(f"{variant:>12}: {tokens_per_s:.1f} tokens/s (median of {args.rounds}, c={args.concurrency}, {args.engine})")
    print(f"json_schema / plain: tokens/s x{summary['json_schema'] / summary['plain']:.3f} (target >= 0.8)")
    out = results_dir() / "structured_output.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "summary": summary}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
