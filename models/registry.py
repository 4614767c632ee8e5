"""The registry: immutable, versioned weights with aliases and history.

A version is content (a manifest of hashed files, stored once in the blob store) plus a
number per model. Engines get a plain Hugging Face folder by path. The registry knows
nothing of engines or HTTP.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from models.catalog import Catalog, Change, VersionRow
from models.lora import ADAPTER_FOLDER, UNMERGED_KIND
from models.manifest import PICKLE_SUFFIXES, FileEntry, Manifest, describe_folder, tokenizer_sha256
from models.names import LATEST, ModelRef, check_name, check_text
from models.store import BlobStore
from models.errors import ConflictError, CorruptVersionError, ForbiddenError, InvalidRequestError, ModelLoadError, NotFoundError

SKIPPED_PARTS = (".git", ".cache", ".huggingface")


@dataclass(frozen=True)
class Version:
    model: str
    number: int
    manifest: Manifest
    path: Path
    is_corrupt: bool
    created_at: str
    aliases: tuple[str, ...]

    @property
    def ref(self) -> str:
        return f"{self.model}@{self.number}"

    @property
    def adapter(self) -> Path | None:
        """The LoRA adapter an engine serves beside the weights, for a version imported unmerged."""
        return self.path / ADAPTER_FOLDER if self.manifest.source.get("kind") == UNMERGED_KIND else None

    @property
    def weights_digest(self) -> str:
        """The digest of what an engine loads as the model, an unmerged adapter aside: the
        same for a base and each adapter imported unmerged on it."""
        if self.adapter is None:
            return self.manifest.digest
        return replace(self.manifest, files=tuple(f for f in self.manifest.files if not f.path.startswith(f"{ADAPTER_FOLDER}/"))).digest

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "version": self.number,
            "ref": self.ref,
            "aliases": list(self.aliases),
            "is_corrupt": self.is_corrupt,
            "created_at": self.created_at,
            "path": str(self.path),
            "manifest": self.manifest.to_dict(),
        }


def held_by(version: Version, in_use: Sequence[str]) -> list[str]:
    """What keeps a version from deletion: an alias other than `latest`, and `in_use` (what serves it)."""
    return [f"alias {a}" for a in version.aliases if a != LATEST] + list(in_use)


@dataclass(frozen=True)
class PrunePlan:
    kept: list[Version]  # the newest
    removed: list[Version]
    held: list[tuple[Version, list[str]]]  # older, but held: (version, by what)


def prune_plan(versions: list[Version], keep: int, holders: Callable[[Version], list[str]]) -> PrunePlan:
    """Rule: the `keep` newest versions stay, held or not; an older one goes unless something
    holds it (an alias, a deployment), since deleting it would move or break that."""
    newest_first = sorted(versions, key=lambda version: version.number, reverse=True)
    older = [(version, holders(version)) for version in newest_first[keep:]]
    return PrunePlan(newest_first[:keep], [v for v, held in older if not held], [(v, held) for v, held in older if held])


@dataclass(frozen=True)
class ImportOptions:
    allow_pickle: bool = False
    trust_remote_code: bool = False
    engine_options: dict | None = None
    labels: dict | None = None
    notes: str = ""
    show_progress: bool = False
    # Where the files may lie once their links are followed (the admin API's import roots);
    # empty: anywhere (an operator's own import may link to a shared checkpoint).
    confine_to: tuple[Path, ...] = ()
    base: str | None = None  # a LoRA adapter's base version (a registry ref): the adapter is merged into it (lora.py)
    merge: bool = True  # False: the adapter is kept apart, beside the base's files, for vLLM to serve unmerged
    move: bool = False  # a local model folder's files leave it for the store once the version is committed, linked where they can be (store.py)

    def __post_init__(self):
        check_text(self.notes, "notes")
        for key, value in (self.labels or {}).items():
            check_text(f"{key}{value}", "labels")


class Registry:
    def __init__(self, home: Path):
        home.mkdir(parents=True, exist_ok=True)
        self.home = home
        self.store = BlobStore(home / "store")
        self._catalog = Catalog(home / "registry.db")

    # -- imports ------------------------------------------------------------------------

    def import_folder(
        self, folder: Path, name: str, source: dict, options: ImportOptions, change: Change, only: tuple[str, ...] | None = None
    ) -> tuple[Version, bool]:
        """Store a Hugging Face folder as a version of `name`; identical content returns the
        existing version (the bool says whether a new one was made). `only`: glob patterns
        of the files to take (relative paths), the rest of the folder is left out."""
        check_name(name)
        files = _model_files(folder, only)
        _check_confined(folder, files, options.confine_to)
        _check_safety(folder, files, options)
        described = describe_folder(folder, files)
        entries = self.store.store_files(folder, files, options.show_progress, take=options.move)
        try:
            _fault_point("after_blobs")
            version, is_new = self._add_version(name, _folder_manifest(entries, described, source, options, change), change)
        except BaseException:
            if options.move:
                self.store.give_back(folder, entries)
            raise
        if options.move:
            self.store.settle_taken(folder, entries)
        return version, is_new

    def import_beside(self, base: Version, folder: Path, files: tuple[str, ...], under: str, name: str, source: dict, options: ImportOptions, change: Change) -> tuple[Version, bool]:
        """Store a version of `name` that is `base`'s files (stored once, shared) with `files`
        of `folder` in the subfolder `under` (an unmerged LoRA adapter)."""
        check_name(name)
        _check_confined(folder, list(files), options.confine_to)
        staged = self.store.new_staging_folder()
        try:
            (staged / under).mkdir()
            for file in files:
                shutil.copyfile(folder / file, staged / under / file)
            entries = self.store.store_files(staged, [f"{under}/{file}" for file in files], options.show_progress)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        manifest = replace(
            base.manifest,
            files=base.manifest.files + entries,
            source=source,
            engine_options=options.engine_options or {},
            labels=options.labels or {},
            notes=options.notes,
            created_by=change.actor,
        )
        return self._add_version(name, manifest, change)

    def _add_version(self, name: str, manifest: Manifest, change: Change) -> tuple[Version, bool]:
        self.store.build_tree(manifest)
        _fault_point("after_tree")
        row, is_new = self._catalog.add_version(name, manifest.to_dict(), change)
        return self._version_of(row), is_new

    def find_by_source(self, name: str, key: str, value) -> Version | None:
        """A version of `name` whose source has `key` == value (a GGUF file's sha, say)."""
        rows = [r for r in self._catalog.versions(name) if r.manifest["source"].get(key) == value]
        return self._version_of(rows[-1]) if rows else None

    # -- reading ------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        return sorted({row.model for row in self._catalog.versions()})

    def versions(self, name: str) -> list[Version]:
        rows = self._catalog.versions(check_name(name))
        if not rows:
            raise self._unknown_model(name)
        aliases = self._catalog.aliases(name)
        return [self._version(row, aliases, is_latest=row is rows[-1]) for row in rows]

    def resolve(self, ref: str | ModelRef) -> Version:
        ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
        versions = self.versions(ref.name)
        number = self._selected_number(ref, versions)
        for version in versions:
            if version.number == number:
                return version
        known = ", ".join(str(v.number) for v in versions)
        raise NotFoundError(f"{ref.name} has no version {ref.selector}. Versions: {known}.", param="version", code="version_not_found")

    def resolve_for_serving(self, ref: str | ModelRef) -> Version:
        """A version an engine may load: not marked corrupt, every file there at its size."""
        version = self.resolve(ref)
        if version.is_corrupt:
            raise CorruptVersionError(f"{version.ref} failed verification and cannot be deployed; import it again or run 'baton models verify {version.ref}' after repairing it.")
        problems = self.store.size_problems(version.manifest)
        if problems:
            self._catalog.set_corrupt(version.model, version.number, True, problems, Change("baton", "size check on load"))
            raise CorruptVersionError(f"{version.ref} is damaged ({'; '.join(problems)}) and cannot be deployed.")
        return version

    def history(self, name: str) -> list[dict]:
        """Kept after a model's last version is deleted: history is never rewritten."""
        events = self._catalog.history(check_name(name))
        if not events:
            raise self._unknown_model(name)
        return events

    def saved_deployments(self) -> dict[str, dict]:
        """Deployments a server saved (name -> version and settings), to restore on start."""
        return self._catalog.saved_deployments()

    def save_deployment(self, name: str, state: dict) -> None:
        self._catalog.save_deployment(name, state)

    def forget_deployment(self, name: str) -> None:
        """A removed deployment: a restart does not bring it back."""
        self._catalog.forget_deployment(name)

    # -- changes ------------------------------------------------------------------------

    def set_alias(self, name: str, selector: str, alias: str, change: Change) -> Version:
        check_name(alias, "alias")
        if alias == LATEST or alias.isdigit():
            raise InvalidRequestError(f"'{alias}' cannot be an alias: it is kept automatically or reads as a version number.", param="alias")
        version = self.resolve(ModelRef(name, selector))
        self._catalog.set_alias(name, alias, version.number, change)
        return self.resolve(ModelRef(name, str(version.number)))

    def verify(self, ref: str, change: Change, show_progress: bool = False) -> tuple[Version, list[str]]:
        version = self.resolve(ref)
        problems = self.store.hash_problems(version.manifest, show_progress)
        self._catalog.set_corrupt(version.model, version.number, bool(problems), problems, change)
        return self.resolve(version.ref), problems

    def remove(self, ref: str, change: Change, force: bool = False, in_use: tuple[str, ...] = ()) -> Version:
        """Delete a version. Refused while it is aliased or in use (deployed), unless forced."""
        version = self.resolve(ref)
        holders = held_by(version, in_use)
        if holders and not force:
            raise ConflictError(f"{version.ref} is held by {', '.join(holders)}; move those first or pass --force.")
        self._catalog.delete_version(version.model, version.number, change)
        return version

    def prune(self, name: str, keep: int, change: Change, in_use: Callable[[str], list[str]], dry_run: bool = False) -> PrunePlan:
        """Delete `name`'s versions older than its `keep` newest, but for those held (see
        `prune_plan`); `in_use(ref)` names what serves one. Files go at the next `gc`."""
        if keep < 1:
            raise InvalidRequestError(f"keep is {keep}: prune keeps the newest version at least (remove a model's last one with rm).", param="keep")
        plan = prune_plan(self.versions(name), keep, lambda version: held_by(version, in_use(version.ref)))
        for version in [] if dry_run else plan.removed:
            self._catalog.delete_version(version.model, version.number, change)
        return plan

    def collect_garbage(self) -> dict:
        live = [Manifest.from_dict(row.manifest) for row in self._catalog.versions()]
        return self.store.collect_garbage(live)

    def record(self, change: Change, action: str, model: str, version: int | None, details: dict) -> None:
        """History for what other parts do with versions (deploys, swaps)."""
        self._catalog.record(change, action, model, version, details)

    # -- helpers --------------------------------------------------------------------------

    def _version_of(self, row: VersionRow) -> Version:
        return self.resolve(ModelRef(row.model, str(row.number)))

    def _version(self, row: VersionRow, aliases: dict[str, int], is_latest: bool) -> Version:
        manifest = Manifest.from_dict(row.manifest)
        names = tuple(alias for alias, number in aliases.items() if number == row.number) + ((LATEST,) if is_latest else ())
        return Version(row.model, row.number, manifest, self.store.tree_path(manifest.digest), row.is_corrupt, row.created_at, names)

    def _selected_number(self, ref: ModelRef, versions: list[Version]) -> int | None:
        if ref.selector == LATEST:
            return versions[-1].number
        if ref.selector.isdigit():
            return int(ref.selector)
        return self._catalog.aliases(ref.name).get(ref.selector)

    def _unknown_model(self, name: str) -> NotFoundError:
        known = ", ".join(self.model_names()) or "none"
        return NotFoundError(f"The registry has no model '{name}'. Known models: {known}.", param="model", code="model_not_found")


def _folder_manifest(entries: tuple[FileEntry, ...], described: dict, source: dict, options: ImportOptions, change: Change) -> Manifest:
    return Manifest(
        files=entries,
        **described,
        tokenizer_sha256=tokenizer_sha256(entries),
        source=source,
        engine_options=options.engine_options or {},
        labels=options.labels or {},
        notes=options.notes,
        created_by=change.actor,
        allows_pickle=options.allow_pickle,
        trusts_remote_code=options.trust_remote_code,
    )


def _model_files(folder: Path, only: tuple[str, ...] | None = None) -> list[str]:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} is not a Hugging Face model folder (no config.json).")
    files = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not any(part in SKIPPED_PARTS for part in p.relative_to(folder).parts)
    )
    if only is not None:
        files = [f for f in files if any(fnmatch.fnmatch(f, pattern) for pattern in only)]
    return files


def _check_confined(folder: Path, files: list[str], roots: tuple[Path, ...]) -> None:
    """A link inside an allowed folder must not reach a file outside the allowed roots."""
    if not roots:
        return
    resolved_roots = [root.resolve() for root in roots]
    for name in files:
        target = (folder / name).resolve()
        if not any(target.is_relative_to(root) for root in resolved_roots):
            raise ForbiddenError(f"{folder / name} links to {target}, outside the import roots; imports over HTTP read files under an import root only.", param="source")


def _check_safety(folder: Path, files: list[str], options: ImportOptions) -> None:
    pickled = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickled and not options.allow_pickle:
        raise ModelLoadError(
            f"{folder} holds pickle files ({', '.join(pickled[:3])}), which can run code when loaded. "
            "Convert them to safetensors, or pass --allow-pickle if you trust them.",
            code="pickle_refused",
        )
    code = [f for f in files if f.endswith(".py")]
    if code and not options.trust_remote_code:
        raise ModelLoadError(
            f"{folder} ships Python code ({', '.join(code[:3])}) that loading would run. Pass --trust-remote-code if you trust it.",
            code="remote_code_refused",
        )
    if not any(f.endswith((".safetensors", *PICKLE_SUFFIXES)) for f in files):
        raise ModelLoadError(f"{folder} has no weights (*.safetensors).")


def _fault_point(name: str) -> None:
    """Crash tests set BATON_FAULT_POINT to kill the process here, as kill -9 would."""
    if os.environ.get("BATON_FAULT_POINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
