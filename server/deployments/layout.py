"""What a model's weights look like from outside: architecture, config, tensor names, dtypes
and shapes, tokenizer. Two versions with the same layout can swap weights inside one running
engine (the `reload` strategy); `reload_blocker` says why two cannot.

Reading a layout touches only config files and safetensors headers (milliseconds, no weight
is loaded); comparing two is a pure function.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

from models.manifest import TOKENIZER_FILES  # the files whose hash the manifest records
from server.engines.options import engine_only
from server.engines.pooling import sentence_transformers_modules

# config.json keys that describe where a file came from, not the network it builds.
PROVENANCE_KEYS = frozenset({"_name_or_path", "transformers_version"})
# generation_config.json keys an engine bakes in at start (stop tokens); the rest are sampling
# defaults, which belong to the version and switch with it (engines/generation_config.py).
STOP_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass(frozen=True)
class ModelLayout:
    architecture: str | None
    config: tuple[tuple[str, str], ...]  # (key, JSON value), provenance keys left out
    tensors: tuple[tuple[str, str, tuple[int, ...]], ...]  # (name, dtype, shape), sorted by name
    tokenizer_sha256: str | None
    stop_tokens: tuple[tuple[str, str], ...]
    modules_sha256: str | None = None  # sentence-transformers' modules (pooling, Dense layers), which vLLM builds in at start

    @classmethod
    def read(cls, folder: Path) -> "ModelLayout":
        config = _read_json(folder / "config.json")
        generation = _read_json(folder / "generation_config.json")
        return cls(
            architecture=(config.get("architectures") or [None])[0],
            config=tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in config.items() if k not in PROVENANCE_KEYS)),
            tensors=_tensors(folder),
            tokenizer_sha256=_tokenizer_sha256(folder),
            stop_tokens=tuple((k, json.dumps(generation.get(k))) for k in STOP_TOKEN_KEYS),
            modules_sha256=_modules_sha256(folder),
        )


def reload_blocker(active: ModelLayout, target: ModelLayout, active_options: dict, target_options: dict) -> str | None:
    """Why `target`'s weights cannot be loaded into the engine that runs `active`; None when
    they can: same architecture, config, tensors (names, dtypes, shapes), tokenizer, stop
    tokens and engine options. The first difference found is the reason given."""
    if active.architecture != target.architecture:
        return f"the architecture differs ({active.architecture} -> {target.architecture})"
    if not active.tensors or not target.tensors:
        return "one of the versions has no safetensors weights to compare"
    if tensor := _first_difference(dict((n, (d, s)) for n, d, s in active.tensors), dict((n, (d, s)) for n, d, s in target.tensors)):
        return f"tensor {tensor}"
    if key := _first_difference(dict(active.config), dict(target.config)):
        return f"config.json {key}"
    if active.tokenizer_sha256 != target.tokenizer_sha256:
        return "the tokenizer differs"
    if key := _first_difference(dict(active.stop_tokens), dict(target.stop_tokens)):
        return f"generation_config.json {key}"
    if active.modules_sha256 != target.modules_sha256:
        return "the sentence-transformers modules differ (modules.json, pooling or Dense layers)"
    if key := _first_difference(engine_only(active_options), engine_only(target_options)):
        return f"engine option {key}"
    return None


def _first_difference(old: dict, new: dict) -> str | None:
    """'NAME: OLD -> NEW' for the first key (in sorted order) whose value differs."""
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            return f"{key}: {_shown(old.get(key))} -> {_shown(new.get(key))}"
    return None


def _shown(value) -> str:
    if value is None:
        return "absent"
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], tuple):
        return f"{value[0]}{list(value[1])}"  # a tensor: dtype[shape]
    return str(value)


def _tensors(folder: Path) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    tensors = []
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_size))
        tensors += [(name, t["dtype"], tuple(t["shape"])) for name, t in header.items() if name != "__metadata__"]
    return tuple(sorted(tensors))


def _tokenizer_sha256(folder: Path) -> str | None:
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            return hashlib.sha256((folder / name).read_bytes()).hexdigest()
    return None


def _modules_sha256(folder: Path) -> str | None:
    """One digest of modules.json and the files of each module folder it names (inside `folder`)."""
    if not (folder / "modules.json").is_file():
        return None
    digest, root = hashlib.sha256((folder / "modules.json").read_bytes()), folder.resolve()
    for where in [(root / str(module.get("path", ""))).resolve() for module in sentence_transformers_modules(folder) or [] if module.get("path")]:
        if where.is_relative_to(root) and where != root and where.is_dir():
            for file in sorted(p for p in where.rglob("*") if p.is_file()):
                digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
