"""What the benchmarks share: starting a server process on a free port and waiting for it."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent


def results_dir() -> Path:
    """benchmarks/results/, made on first use: a fresh clone has none (it is git-ignored)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS


def parse_ab_arguments(description: str, rounds: int) -> argparse.Namespace:
    """The options of the benchmarks that compare two variants of one server in one run:
    the model, the engine, the load (streaming chat at a concurrency) and the rounds."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a Hugging Face folder (default: the demo model)")
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm", "auto"])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=rounds, help="each variant runs this many times, alternating")
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, seconds: float = 600) -> None:
    """Until GET /health answers 200; fails at once if the process exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}; see its log in benchmarks/results/")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def transformers_server(model: Path, *options: str) -> list[str]:
    """`baton serve` of `model` as `bench` on the transformers engine, with `options` (its
    port left as `{port}`)."""
    return [str(BIN / "baton"), "serve", "--model", str(model), "--name", "bench", "--port", "{port}", "--engine", "transformers", "--log-level", "warning", "--no-restore", *options]


def alternating(servers: dict[str, str], num_rounds: int, measure: Callable[[str, int], object]) -> list[dict]:
    """`measure(url, round)` of every server (by variant) in turn, `num_rounds` times, the
    order reversed each round: a machine whose speed drifts moves both sides of a round alike."""
    rounds = []
    for index in range(num_rounds):
        order = list(servers) if index % 2 == 0 else list(reversed(servers))
        rounds.append({variant: measure(servers[variant], index) for variant in order})
    return rounds
