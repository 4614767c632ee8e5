"""Where versions come from: a local folder, the Hugging Face Hub at a revision, a GGUF file.

Sources are written `./folder`, `hf:ORG/NAME@REVISION` and `gguf:./file.gguf`. A folder (local
or from the hub) that holds a LoRA adapter is merged into the base version named with it
(`ImportOptions.base`), and the merged weights are the version (lora.py); or, with `merge`
off, the version is the base's files with the adapter's beside them, served unmerged.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from models.catalog import Change
from models.gguf import convert_gguf
from models.lora import ADAPTER_CONFIG, ADAPTER_FOLDER, ADAPTER_WEIGHTS, UNMERGED_KIND, is_adapter, merge_lora, read_adapter, tensor_shapes
from models.manifest import PICKLE_SUFFIXES
from models.registry import ImportOptions, Registry, Version
from models.store import file_sha256
from models.errors import InvalidRequestError, NotFoundError

HUB_PREFIX = "hf:"
GGUF_PREFIX = "gguf:"


LOADED_FILES = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    "modules.json",  # sentence-transformers' layout: how an embedding model pools (server/engines/pooling.py)
    "*_Pooling/config.json",
    "*_Dense*/config.json",  # a Dense layer's shape and activation; its weights match *.safetensors
)
PICKLE_PATTERNS = tuple(f"*{suffix}" for suffix in PICKLE_SUFFIXES)

def import_source(registry: Registry, source: str, name: str, options: ImportOptions, change: Change) -> tuple[Version, bool]:
    if options.move and source.startswith((HUB_PREFIX, GGUF_PREFIX)):
        raise InvalidRequestError("move takes a local model folder's files into the store; a hub or GGUF import has no such folder.", param="move")
    if source.startswith(HUB_PREFIX):
        return import_hub(registry, source.removeprefix(HUB_PREFIX), name, options, change)
    if source.startswith(GGUF_PREFIX):
        return import_gguf(registry, Path(source.removeprefix(GGUF_PREFIX)), name, options, change)
    return import_local(registry, Path(source), name, options, change)


def import_local(registry: Registry, folder: Path, name: str, options: ImportOptions, change: Change) -> tuple[Version, bool]:
    folder = folder.expanduser().resolve()
    if not folder.is_dir():
        raise NotFoundError(f"No folder at {folder}.", param="source", code="source_not_found")
    return _import_fetched(registry, folder, name, {"kind": "local", "path": str(folder)}, options, change)


def _import_fetched(registry: Registry, folder: Path, name: str, source: dict, options: ImportOptions, change: Change, only: tuple[str, ...] | None = None) -> tuple[Version, bool]:
    if is_adapter(folder):
        if options.move:
            raise InvalidRequestError(f"{folder} is a LoRA adapter, whose files are written anew (merged) or beside its base's: import it without move.", param="move")
        return import_adapter(registry, folder, name, source, options, change)
    if options.base is not None or not options.merge:
        raise InvalidRequestError(f"A base version (and --unmerged) are for LoRA adapters only; {folder} holds no {ADAPTER_CONFIG}.", param="base" if options.base else "merge")
    return registry.import_folder(folder, name, source, options, change, only=only)


def import_adapter(registry: Registry, adapter: Path, name: str, source: dict, options: ImportOptions, change: Change) -> tuple[Version, bool]:
    """Merge the adapter into its base version and import the result, or (`merge` off) import
    the base's files with the adapter's beside them in `adapter/`. Its manifest's source names
    the adapter, its files' digests and the base; engine options default to the base's. The
    same adapter on the same base, imported the same way, returns its version."""
    if options.base is None:
        raise InvalidRequestError(f"{adapter} is a LoRA adapter: name the version it was trained on (--base chat@3, or base in the admin API).", param="base")
    base = registry.resolve_for_serving(options.base)
    if base.adapter is not None:
        raise InvalidRequestError(f"{base.ref} is itself an unmerged adapter; name the version it was trained on ({base.manifest.source.get('base')}).", param="base")
    digests = {file: file_sha256(adapter / file) for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if (adapter / file).is_file()}
    kind = "lora" if options.merge else UNMERGED_KIND
    described = {"kind": kind, "adapter": source, "adapter_sha256": digests, "base": base.ref}
    if (existing := registry.find_by_source(name, "adapter_sha256", digests)) is not None and (existing.manifest.source.get("base"), existing.manifest.source.get("kind")) == (base.ref, kind):
        return existing, False
    if not options.engine_options:
        options = replace(options, engine_options=dict(base.manifest.engine_options))
    if not options.merge:
        read_adapter(adapter, tensor_shapes(base.path))  # refused as a merge would refuse it
        return registry.import_beside(base, adapter, (ADAPTER_CONFIG, ADAPTER_WEIGHTS), ADAPTER_FOLDER, name, described, options, change)
    work = registry.store.new_staging_folder()
    try:
        merged = merge_lora(adapter, base.path, work / "model", options.show_progress)
        return registry.import_folder(merged, name, described, options, change)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def import_hub(registry: Registry, spec: str, name: str, options: ImportOptions, change: Change) -> tuple[Version, bool]:
    """`ORG/NAME@REVISION`; the manifest records the commit the revision resolved to.
    HF_HUB_OFFLINE and HF_HUB_CACHE are honoured as huggingface_hub defines them."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo, _, revision = spec.partition("@")
    if repo.count("/") != 1:
        raise InvalidRequestError(f"Hub sources look like hf:ORG/NAME@REVISION, not hf:{spec}.", param="source")
    patterns = hub_patterns(options)
    try:
        folder = Path(snapshot_download(repo, revision=revision or "main", allow_patterns=list(patterns)))
    except (HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise NotFoundError(f"Cannot fetch {repo} at {revision or 'main'} from the hub: {error}", param="source", code="source_not_found") from error
    source = {"kind": "hub", "repo": repo, "revision": revision or "main", "resolved_revision": folder.name}
    return _import_fetched(registry, folder, name, source, options, change, only=patterns)


def hub_patterns(options: ImportOptions) -> tuple[str, ...]:
    """What a hub import fetches: what baton loads (weights, config, tokenizer, template),
    so a repository that also ships pickle checkpoints or training state imports without
    --allow-pickle; pickle and code files only where the operator allowed them."""
    patterns = LOADED_FILES
    patterns += PICKLE_PATTERNS if options.allow_pickle else ()
    patterns += ("*.py",) if options.trust_remote_code else ()
    return patterns


def import_gguf(registry: Registry, gguf_file: Path, name: str, options: ImportOptions, change: Change) -> tuple[Version, bool]:
    """Dequantize to safetensors, then import the folder. The same GGUF file imported again
    returns its version without converting it again."""
    gguf_file = gguf_file.expanduser().resolve()
    if not gguf_file.is_file():
        raise NotFoundError(f"No GGUF file at {gguf_file}.", param="source", code="source_not_found")
    sha = file_sha256(gguf_file)
    existing = registry.find_by_source(name, "sha256", sha)
    if existing is not None:
        return existing, False
    work = registry.store.new_staging_folder()
    try:
        folder = convert_gguf(gguf_file, work / "model")
        source = {"kind": "gguf", "path": str(gguf_file), "sha256": sha}
        return registry.import_folder(folder, name, source, options, change)
    finally:
        shutil.rmtree(work, ignore_errors=True)
