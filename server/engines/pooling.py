"""Embeddings from a language model: its last hidden states (after the final norm), pooled
into one vector per prompt, as vLLM's pooling runner makes them.

Rule (vLLM's reading of a folder, its `get_pooling_config`): a folder without
sentence-transformers' `modules.json` is a causal language model served for embeddings: the
last token's state, scaled to unit length. With `modules.json`, its Pooling module's config
names the pooling (`pooling_mode`, or the `pooling_mode_*` flag that is true: last token, mean
or first token), and vectors are scaled to unit length only where a Normalize module follows.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from server.engines.kv_cache import left_padded, positions_of

log = logging.getLogger(__name__)

EMBED_BATCH = 16  # prompts run at once: a request's inputs are embedded a batch at a time, decoding steps between them
_MODES = {"lasttoken": "last", "mean": "mean", "cls": "first"}


@dataclass(frozen=True)
class Pooling:
    mode: Literal["last", "mean", "first"] = "last"
    normalize: bool = True


def pooling_of(folder: Path) -> Pooling:
    """How a model folder's states become one vector (see the module's rule)."""
    folder = Path(folder)
    modules = _json(folder / "modules.json")
    if not isinstance(modules, list):
        return Pooling()
    types = {str(module.get("type", "")).rsplit(".", 1)[-1]: module for module in modules if isinstance(module, dict)}
    normalize = "Normalize" in types
    if "Pooling" not in types:
        return Pooling(normalize=normalize)
    config = _json(folder / types["Pooling"].get("path", "") / "config.json")
    names = [config.get("pooling_mode")] if isinstance(config, dict) and isinstance(config.get("pooling_mode"), str) else []
    names += [key for key, value in (config.items() if isinstance(config, dict) else ()) if value is True]
    modes = [_MODES[mode] for name in names if (mode := name.removeprefix("pooling_mode_").split("_", 1)[0]) in _MODES]
    if not modes:
        log.warning("%s names no pooling baton knows (%s): embeddings pool the last token", folder, ", ".join(_MODES))
    return Pooling(modes[0] if modes else "last", normalize)


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("%s is unreadable (%s)", path, error)
        return None


@torch.inference_mode()
def embed(model, prompts: list[list[int]], pad_token_id: int, pooling: Pooling) -> list[list[float]]:
    """One vector per prompt, from one forward pass of the model's base (no LM head) over the
    prompts left-padded together."""
    input_ids, attention_mask = left_padded(prompts, pad_token_id, model.device)
    states = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions_of(attention_mask), use_cache=False).last_hidden_state.float()
    if pooling.mode == "last":
        pooled = states[:, -1]
    elif pooling.mode == "first":
        first_columns = torch.tensor([states.shape[1] - len(prompt) for prompt in prompts], device=states.device)
        pooled = states[torch.arange(len(prompts), device=states.device), first_columns]
    else:
        mask = attention_mask[..., None].float()
        pooled = (states * mask).sum(dim=1) / mask.sum(dim=1)
    return (torch.nn.functional.normalize(pooled, dim=-1) if pooling.normalize else pooled).tolist()
