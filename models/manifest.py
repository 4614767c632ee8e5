"""The immutable description of one version: its files and what they hold."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

from models.errors import ModelLoadError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt")


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, with forward slashes
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    files: tuple[FileEntry, ...]
    architecture: str | None
    dtype: str | None
    num_parameters: int | None
    tokenizer_sha256: str | None
    chat_template_sha256: str | None
    source: dict
    engine_options: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    notes: str = ""
    created_by: str = ""
    allows_pickle: bool = False
    trusts_remote_code: bool = False

    @property
    def digest(self) -> str:
        """The content digest: the same files give the same digest, whatever their source."""
        lines = "".join(f"{f.path}\0{f.size}\0{f.sha256}\n" for f in sorted(self.files, key=lambda f: f.path))
        return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict:
        return {**asdict(self), "digest": self.digest, "total_bytes": self.total_bytes}

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        data = {k: v for k, v in data.items() if k not in ("digest", "total_bytes")}
        return cls(**{**data, "files": tuple(FileEntry(**f) for f in data["files"])})


def describe_folder(folder: Path, files: list[str]) -> dict:
    """What a manifest says about the model itself, read from its config, its safetensors
    headers and its chat template, before anything is stored: ModelLoadError where one of
    them cannot be read."""
    config = _read_json(folder / "config.json")
    return {
        "architecture": (config.get("architectures") or [None])[0],
        "dtype": config.get("dtype") or config.get("torch_dtype"),
        "num_parameters": _count_parameters(folder, [f for f in files if f.endswith(".safetensors")]),
        "chat_template_sha256": _chat_template_sha256(folder, files),
    }


def tokenizer_sha256(entries: tuple[FileEntry, ...]) -> str | None:
    by_path = {f.path: f for f in entries}
    return next((by_path[name].sha256 for name in TOKENIZER_FILES if name in by_path), None)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{path.name} is not valid JSON: {error}.") from error
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path.name} must hold a JSON object.")
    return data


def _count_parameters(folder: Path, safetensors_files: list[str]) -> int | None:
    """Sum of tensor sizes from safetensors headers, without loading any weight."""
    if not safetensors_files:
        return None
    total = 0
    for name in safetensors_files:
        try:
            total += sum(_tensor_sizes(folder / name))
        except (ValueError, KeyError, TypeError, AttributeError, struct.error) as error:
            raise ModelLoadError(f"{name} is not a valid safetensors file ({type(error).__name__}: {error}).") from error
    return total


def _tensor_sizes(path: Path) -> list[int]:
    """Element counts from a safetensors header: 8 bytes of length, then JSON."""
    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        if header_size > path.stat().st_size - 8:
            raise ValueError(f"its header claims {header_size} bytes, more than the file holds")
        header = json.loads(handle.read(header_size))
    return [math.prod(tensor["shape"]) for key, tensor in header.items() if key != "__metadata__"]


def _chat_template_sha256(folder: Path, files: list[str]) -> str | None:
    if "chat_template.jinja" in files:
        return hashlib.sha256((folder / "chat_template.jinja").read_bytes()).hexdigest()
    template = _read_json(folder / "tokenizer_config.json").get("chat_template")
    return hashlib.sha256(json.dumps(template).encode()).hexdigest() if template else None
