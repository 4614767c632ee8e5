"""Embeddings from a language model: its last hidden states (after the final norm), pooled
into one vector per prompt, as vLLM's pooling runner makes them.

Rule (vLLM's reading of a folder, its `get_pooling_config`): a folder without
sentence-transformers' `modules.json` is a causal language model served for embeddings: the
last token's state, scaled to unit length. With `modules.json`, its Pooling module's config
names the pooling (`pooling_mode`, or the `pooling_mode_*` flag that is true: last token, mean
or first token); Dense modules project the pooled vector in their order (a linear layer, then
its activation: vLLM's ST projector), and vectors are scaled to unit length only where a
Normalize module is listed. A Dense layer's weights are read from safetensors only, and its
activation must be one of ACTIVATIONS (a name in a file never picks code to run).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open

from models.errors import ModelLoadError
from server.engines.kv_cache import left_padded, positions_of

log = logging.getLogger(__name__)

EMBED_BATCH = 16  # prompts run at once: a request's inputs are embedded a batch at a time, decoding steps between them
_MODES = {"lasttoken": "last", "mean": "mean", "cls": "first"}


ACTIVATIONS = {  # sentence-transformers' Dense activation_function, by class name
    "Identity": lambda x: x,
    "Tanh": torch.tanh,
    "ReLU": torch.relu,
    "Sigmoid": torch.sigmoid,
    "GELU": torch.nn.functional.gelu,
    "SiLU": torch.nn.functional.silu,
}
DENSE_WEIGHT_KEYS = ("linear.weight", "weight", "dense.weight")  # the names vLLM tries, sentence-transformers' first


@dataclass(frozen=True)
class Dense:
    path: str  # the module's folder, relative to the model's
    activation: str


@dataclass(frozen=True)
class Pooling:
    mode: Literal["last", "mean", "first"] = "last"
    normalize: bool = True
    dense: tuple[Dense, ...] = ()


@dataclass(frozen=True)
class Projection:
    """Loaded Dense layers: (weight, bias or None, activation) each, float32 on the model's device."""

    layers: tuple[tuple[torch.Tensor, torch.Tensor | None, Callable], ...] = ()

    def __call__(self, pooled: torch.Tensor) -> torch.Tensor:
        for weight, bias, activation in self.layers:
            pooled = activation(torch.nn.functional.linear(pooled, weight, bias))
        return pooled


@dataclass(frozen=True)
class Pooler:
    """A folder's pooling, with its Dense layers loaded: what an engine embeds with."""

    pooling: Pooling = Pooling()
    projection: Projection = Projection()

    @classmethod
    def of(cls, folder: Path, device: torch.device) -> Pooler:
        pooling = pooling_of(folder)
        return cls(pooling, load_projection(folder, pooling, device))


def sentence_transformers_modules(folder: Path) -> list[dict] | None:
    """The modules `modules.json` lists (each a dict with `type` and `path`); None without one."""
    modules = _json(Path(folder) / "modules.json")
    return [module for module in modules if isinstance(module, dict)] if isinstance(modules, list) else None


def pooling_of(folder: Path) -> Pooling:
    """How a model folder's states become one vector (see the module's rule)."""
    folder = Path(folder)
    modules = sentence_transformers_modules(folder)
    if modules is None:
        return Pooling()
    named = [(str(module.get("type", "")).rsplit(".", 1)[-1], module) for module in modules]
    types = dict(named)
    normalize = "Normalize" in types
    dense = tuple(_dense(folder, module) for kind, module in named if kind == "Dense")
    if "Pooling" not in types:
        return Pooling(normalize=normalize, dense=dense)
    config = _json(folder / types["Pooling"].get("path", "") / "config.json")
    names = [config.get("pooling_mode")] if isinstance(config, dict) and isinstance(config.get("pooling_mode"), str) else []
    names += [key for key, value in (config.items() if isinstance(config, dict) else ()) if value is True]
    modes = [_MODES[mode] for name in names if (mode := name.removeprefix("pooling_mode_").split("_", 1)[0]) in _MODES]
    if not modes:
        log.warning("%s names no pooling baton knows (%s): embeddings pool the last token", folder, ", ".join(_MODES))
    return Pooling(modes[0] if modes else "last", normalize, dense)


def _dense(folder: Path, module: dict) -> Dense:
    path = str(module.get("path", ""))
    config = _json(folder / path / "config.json")
    activation = str(config.get("activation_function", "Identity") if isinstance(config, dict) else "Identity").rsplit(".", 1)[-1]
    return Dense(path, activation)


def load_projection(folder: Path, pooling: Pooling, device: torch.device) -> Projection:
    """The Dense layers `pooling` names, loaded from `folder`; ModelLoadError for one whose
    weights or activation baton cannot take."""
    layers = []
    for dense in pooling.dense:
        where = (Path(folder) / dense.path).resolve()
        if not where.is_relative_to(Path(folder).resolve()) or not (where / "model.safetensors").is_file():
            raise ModelLoadError(f"The Dense module {dense.path!r} of {folder} has no model.safetensors inside the model folder (pickled weights are not read).")
        if dense.activation not in ACTIVATIONS:
            raise ModelLoadError(f"The Dense module {dense.path!r} of {folder} uses the activation {dense.activation}; baton applies {', '.join(ACTIVATIONS)}.")
        with safe_open(where / "model.safetensors", framework="pt", device="cpu") as weights:
            names = set(weights.keys())
            weight_key = next((key for key in DENSE_WEIGHT_KEYS if key in names), None)
            if weight_key is None:
                raise ModelLoadError(f"The Dense module {dense.path!r} of {folder} holds no weight ({', '.join(DENSE_WEIGHT_KEYS)}).")
            bias_key = weight_key.replace("weight", "bias")
            weight = weights.get_tensor(weight_key).float().to(device)
            bias = weights.get_tensor(bias_key).float().to(device) if bias_key in names else None
        layers.append((weight, bias, ACTIVATIONS[dense.activation]))
    return Projection(tuple(layers))


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log.warning("%s is unreadable (%s)", path, error)
        return None


@torch.inference_mode()
def embed(model, prompts: list[list[int]], pad_token_id: int, pooler: Pooler) -> list[list[float]]:
    """One vector per prompt, from one forward pass of the model's base (no LM head) over the
    prompts left-padded together, pooled, projected, then normalized as `pooler` says."""
    pooling = pooler.pooling
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
    pooled = pooler.projection(pooled)
    return (torch.nn.functional.normalize(pooled, dim=-1) if pooling.normalize else pooled).tolist()
