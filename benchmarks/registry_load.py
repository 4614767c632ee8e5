"""Loading a version through the registry against a raw safetensors load of the same files.

    .venv/bin/python benchmarks/registry_load.py [--ref smollm2] [--repeats 5]

Through the registry means: resolve the ref, check every file's size (what happens on every
load), then load the safetensors files from the version's folder. The anchor loads the same
files with `safetensors` directly. Both run in this process, alternating, after a warm-up,
so the page cache treats them alike. Also measures import throughput (hash + store) in MB/s
by importing the version's folder under a scratch name in a scratch registry.
Target: registry / raw at most 1.1. Writes benchmarks/results/registry_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.catalog import Change  # noqa: E402
from models.registry import ImportOptions, Registry  # noqa: E402
from server.config.settings import default_home  # noqa: E402
from benchmarks.serving import results_dir  # noqa: E402


def main() -> None:
    args = _parse()
    registry = Registry(args.home)
    files = [f.path for f in registry.resolve(args.ref).manifest.files if f.path.endswith(".safetensors")]

    def through_registry() -> None:
        version = registry.resolve_for_serving(args.ref)
        for name in files:
            load_file(version.path / name)

    def raw() -> None:
        folder = registry.resolve(args.ref).path  # resolved once, outside the timing: the anchor is a bare load
        for name in files:
            load_file(folder / name)

    through_registry(), raw()  # warm-up: both read from the page cache from here on
    registry_times, raw_times = [], []
    for _ in range(args.repeats):
        registry_times.append(_timed(through_registry))
        raw_times.append(_timed(raw))
    result = {
        "ref": args.ref,
        "registry_load_s_median": statistics.median(registry_times),
        "raw_safetensors_load_s_median": statistics.median(raw_times),
        "ratio": statistics.median(registry_times) / statistics.median(raw_times),
        "import_mb_per_s": _import_throughput(registry.resolve(args.ref).path),
    }
    print(f"registry load {result['registry_load_s_median'] * 1000:.1f} ms, raw safetensors {result['raw_safetensors_load_s_median'] * 1000:.1f} ms, ratio x{result['ratio']:.3f} (target <= 1.1)")
    print(f"import throughput {result['import_mb_per_s']:.0f} MB/s (hash + store, cold registry)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("BATON_HOME") or default_home()))
    parser.add_argument("--ref", default="smollm2")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=results_dir() / "registry_load.json")
    return parser.parse_args()


def _timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def _import_throughput(folder: Path) -> float:
    with tempfile.TemporaryDirectory() as scratch:
        registry = Registry(Path(scratch))
        started = time.perf_counter()
        version, _ = registry.import_folder(folder, "bench", {"kind": "local"}, ImportOptions(), Change("benchmark"))
        return version.manifest.total_bytes / 1e6 / (time.perf_counter() - started)


if __name__ == "__main__":
    main()
