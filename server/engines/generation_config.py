"""A version's own sampling defaults, from its `generation_config.json`, as vLLM's server reads them.

A model's authors say there how it samples best (Qwen3: temperature 0.6, top_k 20, top_p
0.95). A request that leaves a setting out gets the serving version's value, else OpenAI's
default; a request that sets it keeps its own. The defaults belong to the version, so a swap
(a reload included) changes them together with the version that answers.

Rules, those of `vllm serve` (`--generation-config auto`), so that a model samples alike on
both: only the keys below are read; `max_new_tokens` is the default `max_tokens` (at most the
room the context leaves); a value equal to transformers' own default is not the model's
choice and is left out (`top_k: 50` is what transformers assumes when a file says nothing).
A value of the wrong type or out of the request's own bounds is left out with a warning: a
bad file must not turn every request into an error.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path

log = logging.getLogger(__name__)

# transformers' GenerationConfig defaults: a file that repeats them chooses nothing
TRANSFORMERS_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}
# (lowest, highest, whether the lowest itself is allowed): the bounds a request's own value has
BOUNDS = {
    "temperature": (0.0, 2.0, True),
    "top_p": (0.0, 1.0, False),
    "top_k": (0, math.inf, True),
    "min_p": (0.0, 1.0, True),
    "repetition_penalty": (0.0, math.inf, False),
    "presence_penalty": (-2.0, 2.0, True),
    "frequency_penalty": (-2.0, 2.0, True),
    "max_tokens": (1, math.inf, True),
}


@dataclass(frozen=True)
class SamplingDefaults:
    """None: the version says nothing, and OpenAI's default applies."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    max_tokens: int | None = None

    @classmethod
    def read(cls, folder: Path) -> "SamplingDefaults":
        """From `folder/generation_config.json`; none where it is missing or not JSON."""
        try:
            config = json.loads((Path(folder) / "generation_config.json").read_text())
        except (OSError, ValueError):
            return cls()
        return cls.of(config if isinstance(config, dict) else {}, where=str(folder))

    @classmethod
    def of(cls, config: dict, where: str = "generation_config.json") -> "SamplingDefaults":
        named = {**config, "max_tokens": config.get("max_new_tokens")}
        chosen = {}
        for name in (f.name for f in fields(cls)):
            value = named.get(name)
            if value is None or value == TRANSFORMERS_DEFAULTS.get(name):
                continue
            if _is_within_bounds(name, value):
                chosen[name] = value
            else:
                log.warning("%s: generation config %s=%r is not a valid default; requests use their own or OpenAI's", where, name, value)
        return cls(**chosen)

    def as_dict(self) -> dict:
        """What the version chose, for status pages and model cards."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def _is_within_bounds(name: str, value) -> bool:
    is_integral = name in ("top_k", "max_tokens")
    if isinstance(value, bool) or not isinstance(value, int if is_integral else (int, float)):
        return False
    lowest, highest, takes_lowest = BOUNDS[name]
    return (value >= lowest if takes_lowest else value > lowest) and value <= highest and math.isfinite(value)
