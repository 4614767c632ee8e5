"""The batch sampler alone: the Triton kernel against its torch reference (the anchor) on the
same device and logits, in one run, and the ratio. SmolLM2's vocabulary (49,152) by default.

    .venv/bin/python benchmarks/sampling_kernel.py [--rows 1 8 32] [--vocab 49152]

On CUDA both run; elsewhere only the reference (the kernel needs a GPU, or Triton's
interpreter, which is for tests, not timing). Writes benchmarks/results/sampling_kernel.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serving import results_dir  # noqa: E402
from kernels.sampling import sample_reference, sample_triton  # noqa: E402

SETTINGS = {"greedy": (0.0, 1.0), "temperature": (0.8, 1.0), "top-p 0.9": (0.8, 0.9)}


def main() -> None:
    args = _parse()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    samplers = {"reference": sample_reference} | ({"kernel": sample_triton} if device.type == "cuda" else {})
    results = []
    for rows in args.rows:
        logits = torch.randn(rows, args.vocab, device=device) * 3
        seeds = torch.arange(rows, device=device)
        for setting, (temperature, top_p) in SETTINGS.items():
            arguments = (logits, torch.full((rows,), temperature, device=device), torch.full((rows,), top_p, device=device), seeds)
            timings = {name: _median_ms(sampler, arguments, args.repeats) for name, sampler in samplers.items()}
            results.append({"rows": rows, "setting": setting, "device": str(device), **{f"{n}_ms": t for n, t in timings.items()}})
            ratio = f"  kernel x{timings['reference'] / timings['kernel']:.1f} faster" if "kernel" in timings else ""
            print(f"rows {rows:3d}  {setting:12s}  " + "  ".join(f"{n} {t:7.3f} ms" for n, t in timings.items()) + ratio)
    out = results_dir() / "sampling_kernel.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


def _median_ms(sampler, arguments, repeats: int) -> float:
    """Each call ends with the ids on the host, as the engine's step does."""
    times = []
    for step in range(repeats + 3):  # 3 warm-up calls (the kernel compiles on its first)
        started = time.perf_counter()
        sampler(*arguments, torch.full_like(arguments[3], step)).tolist()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times[3:])


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=20)
    return parser.parse_args()


if __name__ == "__main__":
    main()
