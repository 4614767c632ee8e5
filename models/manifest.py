"""The immutable description of one version: its files and what they hold."""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

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


def describe_folder(folder: Path, files: tuple[FileEntry, ...]) -> dict:
    """What a manifest says about the model itself, read from its config and headers."""
    config = _read_json(folder / "config.json")
    by_path = {f.path: f for f in files}
    return {
        "architecture": (config.get("architectures") or [None])[0],
        "dtype": config.get("dtype") or config.get("torch_dtype"),
        "num_parameters": _count_parameters(folder, [f.path for f in files if f.path.endswith(".safetensors")]),
        "tokenizer_sha256": next((by_path[n].sha256 for n in TOKENIZER_FILES if n in by_path), None),
        "chat_template_sha256": _chat_template_sha256(folder, by_path),
    }


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _count_parameters(folder: Path, safetensors_files: list[str]) -> int | None:
    """Sum of tensor sizes from safetensors headers, without loading any weight."""
    if not safetensors_files:
        return None
    total = 0
    for name in safetensors_files:
        with open(folder / name, "rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_size))
        for key, tensor in header.items():
            if key != "__metadata__":
                count = 1
                for dim in tensor["shape"]:
                    count *= dim
                total += count
    return total


def _chat_template_sha256(folder: Path, by_path: dict[str, FileEntry]) -> str | None:
    if "chat_template.jinja" in by_path:
        return by_path["chat_template.jinja"].sha256
    template = _read_json(folder / "tokenizer_config.json").get("chat_template")
    return hashlib.sha256(json.dumps(template).encode()).hexdigest() if template else None
