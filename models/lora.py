"""A LoRA adapter merged into its base version's weights: a full Hugging Face folder of the
base's layout, so a swap between the base and its fine-tunes (or between fine-tunes of one
base) is a `reload`, the weights changed in place in under a second. Or kept apart (an
import with --unmerged): the base's files with the adapter's in `adapter/`, which vLLM serves
as a LoRA beside the base weights (an engine without multi-LoRA merges it as it loads),
checked here as a merge would be.

Rules: the adapter is read as PEFT writes it (`adapter_config.json`, and
`adapter_model.safetensors`; never pickle). Each adapted linear layer's weight becomes
W + scale * B @ A, computed in float32 and stored in the base's dtype, with scale
lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA) and per-layer `rank_pattern` and
`alpha_pattern` overrides. What a plain merge cannot honour (DoRA, `modules_to_save`, bias
training, another PEFT method) is refused, never approximated; so is an adapter tensor that
names no weight of the base, or whose shape does not fit it. The merged folder appears whole
or not at all.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from models.errors import InvalidRequestError, ModelLoadError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
UNMERGED_KIND = "lora-unmerged"  # a manifest source's kind: the base's files, the adapter in ADAPTER_FOLDER
ADAPTER_FOLDER = "adapter"  # where an unmerged version keeps its adapter, beside the base's files (no engine looks in subfolders for weights)
_ADAPTER_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


def is_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file()


def merge_lora(adapter: Path, base: Path, target: Path, show_progress: bool = False) -> Path:
    """Write `base` with `adapter` merged into `target` (which must not exist yet), a shard
    of the base at a time, once the adapter is checked against the base's shapes."""
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    read = read_adapter(adapter, tensor_shapes(base))
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.with_name(f".{target.name}.merging")
    shutil.rmtree(work, ignore_errors=True)
    try:
        shutil.copytree(base, work, ignore=shutil.ignore_patterns("*.safetensors"))
        for shard in tqdm(sorted(base.glob("*.safetensors")), desc="merging the adapter", unit="shard", disable=not show_progress):
            tensors = load_file(shard)
            read.merge_into(tensors)
            save_file(tensors, work / shard.name, metadata={"format": "pt"})
        work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, read from the safetensors headers (not the weights)."""
    from safetensors import safe_open

    shapes = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as tensors:
            shapes.update({name: tuple(tensors.get_slice(name).get_shape()) for name in tensors.keys()})
    return shapes


@dataclass(frozen=True)
class ReadAdapter:
    """An adapter read and checked against the weights it will change: `merge_into` them
    (how an engine without multi-LoRA serves a version imported unmerged)."""

    updates: tuple[tuple[str, object, object, float], ...]  # (weight name, A, B, scale)
    fan_in_fan_out: bool

    def merge_into(self, weights: dict) -> None:
        """Changes, in place, those of its weights that `weights` holds (a model's state dict,
        or one shard of a checkpoint)."""
        import torch

        with torch.no_grad():
            for name, down, up, scale in self.updates:
                if (weight := weights.get(name)) is None:
                    continue
                weight.copy_(_merged(weight, down.to(weight.device), up.to(weight.device), scale, self.fan_in_fan_out, torch))


def read_adapter(adapter: Path, shapes: dict[str, tuple]) -> ReadAdapter:
    """Everything checked before a weight changes: the refusals of a merge, and each update
    against `shapes` (weight name -> shape)."""
    from safetensors.torch import load_file

    config = _checked_config(adapter)
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    updates = []
    for module, (down, up) in _lora_pairs(adapter, load_file).items():
        if (shape := shapes.get(f"{module}.weight")) is None:
            raise InvalidRequestError(f"The adapter changes {module}, which the base has no weight for: it was trained on another model.", param="base")
        _check_shape(tuple(shape), (up.shape[0], down.shape[1]), fan_in_fan_out)
        updates.append((f"{module}.weight", down, up, _scale(config, module)))
    return ReadAdapter(tuple(updates), fan_in_fan_out)


def _checked_config(adapter: Path) -> dict:
    try:
        config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    except ValueError as error:
        raise ModelLoadError(f"{ADAPTER_CONFIG} is not JSON: {error}") from error
    refusals = [
        (config.get("peft_type", "LORA") != "LORA", f"a {config.get('peft_type')} adapter (only LoRA merges into the weights)"),
        (bool(config.get("use_dora")), "a DoRA adapter (its magnitude vectors do not merge as a plain LoRA)"),
        (bool(config.get("modules_to_save")), f"an adapter that also trained whole modules ({', '.join(config.get('modules_to_save') or [])})"),
        (config.get("bias", "none") != "none", f"an adapter that trained biases ({config.get('bias')})"),
        (not isinstance(config.get("r"), int) or config["r"] < 1, "an adapter without a rank r"),
    ]
    if reasons := [reason for refused, reason in refusals if refused]:
        raise InvalidRequestError(f"Cannot merge {reasons[0]}.", param="source", code="unsupported_adapter")
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise InvalidRequestError(f"The adapter has no {ADAPTER_WEIGHTS} (pickled adapter weights are never loaded).", param="source", code="unsupported_adapter")
    return config


def _lora_pairs(adapter: Path, load_file) -> dict[str, tuple]:
    """module path -> (A, B), from the adapter's tensors as PEFT names them."""
    parts: dict[str, dict[str, object]] = {}
    for key, tensor in load_file(adapter / ADAPTER_WEIGHTS).items():
        match = _ADAPTER_KEY.match(key)
        if match is None:
            raise InvalidRequestError(f"The adapter holds {key}, which is no LoRA A or B matrix: it cannot be merged.", param="source", code="unsupported_adapter")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    if incomplete := sorted(module for module, found in parts.items() if set(found) != {"A", "B"}):
        raise InvalidRequestError(f"The adapter has only one of the A and B matrices of {incomplete[0]}.", param="source", code="unsupported_adapter")
    if not parts:
        raise InvalidRequestError("The adapter holds no LoRA matrices.", param="source", code="unsupported_adapter")
    return {module: (found["A"], found["B"]) for module, found in parts.items()}


def _scale(config: dict, module: str) -> float:
    """lora_alpha / r, with the rank and alpha patterns PEFT matches against a module's path."""
    rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", config["r"]))
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: the first pattern that matches the end of the module's path."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _merged(weight, down, up, scale: float, fan_in_fan_out: bool, torch):
    """fan_in_fan_out: the base stores the layer transposed (GPT-2's Conv1D), and so the update."""
    delta = up.to(torch.float32) @ down.to(torch.float32)  # its shape was checked as the adapter was read
    delta = delta.T if fan_in_fan_out else delta
    return (weight.to(torch.float32) + scale * delta).to(weight.dtype)


def _check_shape(weight: tuple, update: tuple, fan_in_fan_out: bool) -> None:
    """`update`: B @ A's (out, in); a fan_in_fan_out base stores its weight as (in, out)."""
    update = update[::-1] if fan_in_fan_out else update
    if tuple(update) != tuple(weight):
        raise InvalidRequestError(f"The adapter's update is {tuple(update)} where the base weight is {tuple(weight)}: it was trained on another model.", param="base")
