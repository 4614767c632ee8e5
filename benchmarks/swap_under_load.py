"""Swaps under open-loop load, one run per strategy.

    .venv/bin/python benchmarks/swap_under_load.py [--model FOLDER] [--rate 1.5] [--seconds 30] [--swap-at 10]

For each strategy (reload, blue-green, replace, standby) a fresh `baton serve` subprocess
serves `chat@1` (--model, default the demo model) while Poisson arrivals of streaming chat
requests run; at --swap-at seconds the deployment swaps to `chat@2` (the same weights with
another generation config: a distinct version of the same layout, so reload applies and
every strategy does its whole work: reading and copying weights, or a second engine).
`adapter` (vLLM only, not run unless named) serves a random LoRA adapter of the model,
imported unmerged, and swaps under the same load to another (`auto`: the engine they share
loads it, nothing is held); read it next to `reload`, the swap of a merged fine-tune.
The swap's hold time (new requests held: reload and replace) is printed per strategy, so
reload's is read next to replace's. A swap that fails is reported as a result. Reports failed requests,
the longest stretch with no first token within the SLO, cutover (command to the first
token from the new version), drain time, TTFT p50/p99 before, during and after the swap
(the anchor is steady state: the ratio during/before is printed), and the server's peak RSS.
Writes benchmarks/results/swap_under_load.json and, with matplotlib, a PNG timeline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

from models.catalog import Change  # noqa: E402
from models.demo import ensure_demo_model  # noqa: E402
from models.registry import ImportOptions, Registry  # noqa: E402
from server.config.settings import default_home  # noqa: E402
from benchmarks.serving import free_port, wait_ready  # noqa: E402


# The adapter run's versions: chat@1 the base (LoRA on), chat@2 and chat@3 adapters of it.
ADAPTER_SWAP = ("chat@2", "chat@3", "auto")  # served first, swapped to, strategy asked for


def main() -> None:
    args = _parse()
    with tempfile.TemporaryDirectory() as scratch:
        homes = {"versions": _two_versions(Path(scratch), args.model, args.engine)}
        if "adapter" in args.strategies:
            homes["adapter"] = _adapter_versions(Path(scratch), args.model)
        runs = {strategy: _run(homes.get(strategy, homes["versions"]), strategy, args) for strategy in args.strategies}
    _report(runs, args)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a Hugging Face model folder (default: the demo model)")
    parser.add_argument("--rate", type=float, default=1.5, help="requests per second (Poisson)")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--swap-at", type=float, default=10.0)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--slo", type=float, default=2.0, help="TTFT objective in seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", default="transformers", choices=["transformers", "vllm", "auto"], help="the versions' engine")
    parser.add_argument("--strategies", nargs="+", default=["reload", "blue-green", "replace", "standby"], help="and adapter (vLLM)")
    parser.add_argument("--standby-swaps", type=int, default=40, help="unloaded standby swaps timed for the p99")
    return parser.parse_args()


def _two_versions(scratch: Path, model: Path | None, engine: str) -> Path:
    first = model or ensure_demo_model(Registry(Path(os.environ.get("BATON_HOME") or default_home()))).path
    home = scratch / "home"
    registry = Registry(home)
    second = scratch / "second"
    shutil.copytree(first, second)
    generation = second / "generation_config.json"
    generation.chmod(0o644) if generation.exists() else None
    defaults = json.loads(generation.read_text()) if generation.exists() else {}
    generation.write_text(json.dumps({**defaults, "benchmark": "v2"}))  # a new version; stop tokens kept
    for folder in (first, second):
        registry.import_folder(folder, "chat", {"kind": "local"}, ImportOptions(engine_options={"engine": engine}), Change("benchmark"))
    return home


def _adapter_versions(scratch: Path, model: Path | None) -> Path:
    from benchmarks.random_model import build_random_adapter
    from models.importers import import_source

    base = model or ensure_demo_model(Registry(Path(os.environ.get("BATON_HOME") or default_home()))).path
    home = scratch / "adapter-home"
    registry = Registry(home)
    registry.import_folder(base, "chat", {"kind": "local"}, ImportOptions(engine_options={"engine": "vllm", "max_loras": 2}), Change("benchmark"))
    for seed in (0, 1):
        adapter = build_random_adapter(scratch / f"adapter{seed}", base, rank=16, alpha=32, seed=seed)
        import_source(registry, str(adapter), "chat", ImportOptions(base="chat@1", merge=False), Change("benchmark"))
    return home


def _run(home: Path, strategy: str, args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first, to, asked = ADAPTER_SWAP if strategy == "adapter" else ("chat@1", "chat@2", strategy)
    command = [str(Path(sys.executable).parent / "baton"), "--home", str(home), "serve", "--model", first, "--name", "chat", "--port", str(port), "--log-level", "warning", "--no-restore"]
    log = open(RESULTS / f"swap_{strategy}.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(url, server)
        if strategy == "standby":  # put chat@2 on standby first: swap there and back
            _swap(url, "chat@2", "blue-green", fallback="replace")  # replace parks it asleep where engines sleep (GPU)
            _swap(url, "chat@1", "standby")
        rss = _RssSampler(server.pid)
        rss.start()
        requests, swap = asyncio.run(_load(url, to, asked, args))
        rss.stop()
        summary = _summarise(requests, swap, to, rss.peak_bytes, args)
        if strategy == "standby":
            summary["standby_command_round_trip"] = _standby_round_trips(url, args.standby_swaps)
        return summary
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


async def _load(url: str, to: str, strategy: str, args) -> tuple[list[dict], dict]:
    rng = random.Random(args.seed)
    client = httpx.AsyncClient(base_url=url, timeout=300)
    started = time.perf_counter()
    tasks, swap = [], {}

    async def swap_later():
        await asyncio.sleep(args.swap_at)
        swap["sent"] = time.perf_counter() - started
        response = await client.post("/admin/deployments/chat/swap", json={"to": to, "strategy": strategy}, timeout=600)
        swap["done"] = time.perf_counter() - started
        swap["record"] = response.json()

    swapper = asyncio.create_task(swap_later())
    next_arrival = 0.0
    while next_arrival < args.seconds:
        await asyncio.sleep(max(0.0, next_arrival - (time.perf_counter() - started)))
        tasks.append(asyncio.create_task(_one(client, started, args.max_tokens)))
        next_arrival += rng.expovariate(args.rate)
    requests = await asyncio.gather(*tasks)
    await swapper
    await client.aclose()
    return requests, swap


async def _one(client: httpx.AsyncClient, started: float, max_tokens: int) -> dict:
    sent = time.perf_counter() - started
    result = {"sent": sent, "first_token": None, "end": None, "version": None, "ok": False}
    body = {"model": "chat", "messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": max_tokens, "temperature": 0, "stream": True}
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            result["version"] = response.headers.get("x-baton-version")
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    result["ok"] = response.status_code == 200
                elif line.startswith("data: "):
                    event = json.loads(line.removeprefix("data: "))
                    if "error" in event:
                        raise RuntimeError(event["error"]["message"])
                    if result["first_token"] is None and any(c["delta"].get("content") for c in event["choices"]):
                        result["first_token"] = time.perf_counter() - started
    except Exception as error:  # a failed request is what this benchmark counts
        result["error"] = str(error)[:200]
    result["end"] = time.perf_counter() - started
    return result


def _summarise(requests: list[dict], swap: dict, to: str, peak_rss: int, args) -> dict:
    ttft = lambda rs: sorted(r["first_token"] - r["sent"] for r in rs if r["first_token"] is not None)  # noqa: E731
    before = [r for r in requests if r["sent"] < swap["sent"]]
    during = [r for r in requests if swap["sent"] <= r["sent"] <= swap["done"]]
    after = [r for r in requests if r["sent"] > swap["done"]]
    record = swap["record"]  # a swap record, or an error body when the swap was refused or failed
    phases = {p["name"]: p["duration_s"] or 0.0 for p in record.get("phases", [])}
    # Cutover: command to first token from the new version, for a request ready at the flip.
    until_flip = sum(list(phases.values())[: list(phases).index("flip") + 1]) if "flip" in phases else None
    new = []
    if until_flip is not None:
        flipped_at = swap["sent"] + until_flip
        new = [until_flip + r["first_token"] - max(r["sent"], flipped_at) for r in requests if r["version"] == to and r["first_token"]]
    return {
        "requests": len(requests),
        "failed": sum(not r["ok"] for r in requests),
        "swap_status": record.get("status", "failed"),
        "swap_error": record.get("error") if isinstance(record.get("error"), str) else (record.get("error") or {}).get("message"),
        "strategy_chosen": record.get("strategy"),
        "swap_seconds": round(swap["done"] - swap["sent"], 3),
        "cutover_s": round(min(new), 3) if new else None,
        "until_flip_s": round(until_flip, 4) if until_flip is not None else None,
        "hold_s": _hold_seconds(phases),
        "phases": phases,
        "flip_s": phases.get("flip"),
        "drain_s": phases.get("drain"),
        "longest_gap_without_slo_first_token_s": _longest_gap(requests, args.slo, args.seconds),
        "ttft": {name: _percentiles(ttft(rs)) for name, rs in (("before", before), ("during", during), ("after", after))},
        "peak_rss_mb": round(peak_rss / 1e6),
        "timeline": requests,
        "swap": {k: v for k, v in swap.items() if k != "record"},
    }


def _hold_seconds(phases: dict) -> float | None:
    """How long new requests were held: a swap that holds them (reload, replace, standby in
    turn) drains before it flips, and releases them at the flip; one that does not, holds
    none. None when the swap never flipped."""
    names = list(phases)
    if "flip" not in names:
        return None
    if "drain" not in names or names.index("drain") > names.index("flip"):
        return 0.0
    return round(sum(phases[n] for n in names[names.index("drain") : names.index("flip") + 1]), 3)


def _longest_gap(requests: list[dict], slo: float, seconds: float) -> float:
    """The longest stretch of the run with no first token delivered within the SLO."""
    good = sorted(r["first_token"] for r in requests if r["first_token"] is not None and r["first_token"] - r["sent"] <= slo)
    marks = [0.0, *good, max(seconds, good[-1] if good else seconds)]
    return round(max(b - a for a, b in zip(marks, marks[1:])), 3)


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50_s": None, "p99_s": None}
    p99 = values[min(len(values) - 1, round(0.99 * (len(values) - 1)))]
    return {"n": len(values), "p50_s": round(statistics.median(values), 3), "p99_s": round(p99, 3)}


def _report(runs: dict, args) -> None:
    for strategy, run in runs.items():
        t = run["ttft"]
        during = f"during {t['during']['p50_s']}/{t['during']['p99_s']} s" if t["during"]["n"] else "none sent during the swap"
        ratio = f"; p99 during / steady state x{t['during']['p99_s'] / t['before']['p99_s']:.2f}" if t["during"]["n"] and t["before"]["p99_s"] else ""
        print(
            f"{strategy:>10}: {run['requests']} requests, {run['failed']} failed, swap {run['swap_status']} in {run['swap_seconds']} s, "
            f"new requests held {run['hold_s']} s "
            f"(new requests routed after {run['until_flip_s']} s, drain {run['drain_s']} s), cutover {run['cutover_s']} s, "
            f"longest gap without an in-SLO first token {run['longest_gap_without_slo_first_token_s']} s, peak RSS {run['peak_rss_mb']} MB"
        )
        print(
            f"{'':>10}  TTFT p50/p99 before {t['before']['p50_s']}/{t['before']['p99_s']} s, {during}, "
            f"after {t['after']['p50_s']}/{t['after']['p99_s']} s{ratio}"
        )
        if run["swap_error"]:
            print(f"{'':>10}  swap failed: {run['swap_error']}")
        if "standby_command_round_trip" in run:
            trips = run["standby_command_round_trip"]
            print(f"{'':>10}  standby swap command round trip (no load, n={trips['n']}): p50 {trips['p50_s'] * 1000:.1f} ms, p99 {trips['p99_s'] * 1000:.1f} ms")
    out = RESULTS / "swap_under_load.json"
    out.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2, default=str))
    print(f"wrote {out}")
    _plot(runs)


def _plot(runs: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install '.[bench]'): no PNG timeline")
        return
    figure, axes = plt.subplots(len(runs), 1, figsize=(10, 3 * len(runs)), squeeze=False)
    for axis, (strategy, run) in zip(axes[:, 0], runs.items()):
        for version, colour in (("chat@1", "tab:blue"), ("chat@2", "tab:orange"), ("chat@3", "tab:green")):
            points = [(r["sent"], r["first_token"] - r["sent"]) for r in run["timeline"] if r["version"] == version and r["first_token"]]
            axis.scatter([p[0] for p in points], [p[1] for p in points], s=12, color=colour, label=version)
        failed = [r["sent"] for r in run["timeline"] if not r["ok"]]
        axis.scatter(failed, [0] * len(failed), marker="x", color="red", label="failed")
        axis.axvspan(run["swap"]["sent"], run["swap"]["done"], color="grey", alpha=0.2, label="swap")
        axis.set(title=strategy, xlabel="seconds", ylabel="TTFT (s)")
        axis.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(RESULTS / "swap_under_load.png", dpi=100)
    print(f"wrote {RESULTS / 'swap_under_load.png'}")


class _RssSampler(threading.Thread):
    """Peak resident memory of the server and its children, sampled every 100 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self._process = psutil.Process(pid)
        self._stopping = threading.Event()
        self.peak_bytes = 0

    def run(self) -> None:
        while not self._stopping.wait(0.1):
            try:
                processes = [self._process, *self._process.children(recursive=True)]
                self.peak_bytes = max(self.peak_bytes, sum(p.memory_info().rss for p in processes))
            except psutil.Error:
                return

    def stop(self) -> None:
        self._stopping.set()
        self.join()


def _standby_round_trips(url: str, count: int) -> dict:
    """Standby swaps back and forth with no load: the whole command, flip included, over one
    kept-alive connection (as an operator's tooling would hold)."""
    durations = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(count):
            started = time.perf_counter()
            body = {"to": "chat@1" if i % 2 == 0 else "chat@2", "strategy": "standby"}
            client.post("/admin/deployments/chat/swap", json=body).raise_for_status()
            durations.append(time.perf_counter() - started)
    return _percentiles(sorted(durations))


def _swap(url: str, to: str, strategy: str, fallback: str | None = None) -> None:
    response = httpx.post(f"{url}/admin/deployments/chat/swap", json={"to": to, "strategy": strategy}, timeout=600)
    if response.status_code == 409 and fallback:  # the memory plan does not fit both
        return _swap(url, to, fallback)
    if response.is_error:
        raise SystemExit(f"swap to {to} ({strategy}) refused: {response.status_code} {response.text}")





if __name__ == "__main__":
    RESULTS.mkdir(parents=True, exist_ok=True)
    main()
