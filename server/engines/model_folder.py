"""What every engine checks before it loads a folder: that it is a model, and that its
weights cannot run code unless the operator said so."""

from __future__ import annotations

import json
from pathlib import Path

from models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter
from models.manifest import PICKLE_SUFFIXES
from models.errors import ModelLoadError


def read_config(path: Path) -> dict:
    """The folder's config.json; empty where it cannot be read (the engine that loads the
    folder says what is wrong)."""
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def check_model_folder(path: Path, allow_pickle: bool) -> None:
    """Refuse what is not a model folder, and pickle-only weights unless allowed."""
    if not (path / "config.json").is_file():
        if is_adapter(path):
            raise ModelLoadError(f"{path} is a LoRA adapter, not a model: import it with the version it was trained on (baton models import {path} --name NAME --base REF), then serve that.")
        raise ModelLoadError(f"{path} is not a Hugging Face model folder (no config.json).")
    names = [p.name for p in path.iterdir()]
    has_safetensors = any(name.endswith(".safetensors") for name in names)
    has_pickle = any(name.endswith(PICKLE_SUFFIXES) for name in names)
    if not has_safetensors and has_pickle and not allow_pickle:
        raise ModelLoadError(
            f"{path} holds only pickle weights (.bin/.pt), which can run code when loaded. "
            "Convert them to safetensors, or pass --allow-pickle if you trust them."
        )
    if not has_safetensors and not has_pickle:
        raise ModelLoadError(f"{path} has no weights (*.safetensors).")


def check_adapter_folder(path: Path) -> None:
    """A LoRA adapter an engine serves unmerged: PEFT's config and safetensors weights (its
    pickled `adapter_model.bin` is never loaded, as in a merge)."""
    if not is_adapter(path) or not (path / ADAPTER_WEIGHTS).is_file():
        raise ModelLoadError(f"{path} holds no LoRA adapter ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}).")
