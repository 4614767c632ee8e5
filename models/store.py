"""Content-addressed weights: blobs by sha256, and one read-only folder (a tree of hard
links to the blobs) per distinct version content, which engines load by path.

Rules: a blob or a tree appears whole or not at all (written in staging, then renamed);
files are read-only once stored; staging folders of dead processes are removed on open.
A file an import moves (`take`) is hard-linked into the store rather than copied, but only a
plain file with no other name, on the store's filesystem. Its outside name goes once the
version is committed (`settle_taken`), or it becomes a copy of its own if the import fails
(`give_back`): either way no name outside the store can write into a blob afterwards. (A
process killed between the two leaves the link; re-running the moving import settles it.)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import uuid
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from models.manifest import FileEntry, Manifest

CHUNK_BYTES = 8 * 1024 * 1024


class BlobStore:
    def __init__(self, root: Path):
        self._blobs = root / "blobs" / "sha256"
        self._trees = root / "trees"
        self._staging = root / "staging"
        for folder in (self._blobs, self._trees, self._staging):
            folder.mkdir(parents=True, exist_ok=True)
        self._remove_stale_staging()

    def new_staging_folder(self) -> Path:
        """A private scratch folder, named after this process so a later open can tell it is stale."""
        folder = self._staging / f"{os.getpid()}-{uuid.uuid4().hex}"
        folder.mkdir()
        return folder

    def store_files(self, folder: Path, relative_paths: list[str], progress: bool, take: bool = False) -> tuple[FileEntry, ...]:
        """Each file stored as a blob (once per content): copied, or with `take` linked where
        it can be; then the caller settles the taken files or gives them back."""
        total = sum((folder / p).stat().st_size for p in relative_paths)
        with tqdm(total=total, unit="B", unit_scale=True, desc="hashing and storing", disable=not progress) as bar:
            return tuple(self._store_file(folder / p, p, bar, take) for p in relative_paths)

    def build_tree(self, manifest: Manifest) -> Path:
        tree = self.tree_path(manifest.digest)
        if tree.is_dir():
            return tree
        staged = self.new_staging_folder() / "tree"
        for entry in manifest.files:
            target = staged / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(self._blob_path(entry.sha256), target)
        try:
            staged.rename(tree)
        except OSError:
            if not tree.is_dir():  # another import of the same content won the race: fine
                raise
        shutil.rmtree(staged.parent, ignore_errors=True)
        return tree

    def tree_path(self, digest: str) -> Path:
        return self._trees / digest.removeprefix("sha256:")

    def size_problems(self, manifest: Manifest) -> list[str]:
        """Cheap check on every load: each file is there with its recorded size."""
        tree = self.tree_path(manifest.digest)
        problems = []
        for entry in manifest.files:
            path = tree / entry.path
            if not path.is_file():
                problems.append(f"{entry.path} is missing")
            elif path.stat().st_size != entry.size:
                problems.append(f"{entry.path} has {path.stat().st_size} bytes, expected {entry.size}")
        return problems

    def hash_problems(self, manifest: Manifest, progress: bool) -> list[str]:
        """Full re-hash: every file's sha256 against the manifest."""
        problems = self.size_problems(manifest)
        if problems:
            return problems
        tree = self.tree_path(manifest.digest)
        with tqdm(total=manifest.total_bytes, unit="B", unit_scale=True, desc="verifying", disable=not progress) as bar:
            for entry in manifest.files:
                if file_sha256(tree / entry.path, bar) != entry.sha256:
                    problems.append(f"{entry.path} does not match its sha256")
        return problems

    def collect_garbage(self, live: Iterable[Manifest]) -> dict:
        """Remove trees and blobs no version refers to."""
        live = list(live)
        live_trees = {m.digest.removeprefix("sha256:") for m in live}
        live_blobs = {f.sha256 for m in live for f in m.files}
        num_trees = _remove_unlisted(self._trees, live_trees)
        freed = sum(p.stat().st_size for p in self._blobs.iterdir() if p.name not in live_blobs)
        num_blobs = _remove_unlisted(self._blobs, live_blobs)
        return {"removed_trees": num_trees, "removed_blobs": num_blobs, "freed_bytes": freed}

    def _store_file(self, source: Path, relative: str, bar: tqdm, take: bool) -> FileEntry:
        staged = self._staging / f"{os.getpid()}-{uuid.uuid4().hex}.blob"
        is_taken = take and _can_take(source) and _linked(source, staged)
        sha = file_sha256(staged, bar) if is_taken else _copied_sha256(source, staged, bar)
        blob = self._blob_path(sha)
        if blob.exists():
            staged.unlink()  # deduplicated: the content is stored already
            blob.chmod(0o444)  # a failed moving import's blob turns read-only once a version has it
        else:
            if not is_taken:  # a taken file keeps its mode until its import settles
                staged.chmod(0o444)
            staged.rename(blob)
        return FileEntry(relative, blob.stat().st_size, sha)

    def settle_taken(self, folder: Path, entries: tuple[FileEntry, ...]) -> None:
        """After a moving import's commit: every blob read-only, the folder's names for the
        stored files gone, and then every folder left empty (the folder itself included), as
        `mv` leaves a source."""
        for entry in entries:
            self._blob_path(entry.sha256).chmod(0o444)
            (folder / entry.path).unlink(missing_ok=True)
        emptied = {parent for entry in entries for parent in (folder / entry.path).parents if parent.is_relative_to(folder)}
        for directory in sorted(emptied, key=lambda path: len(path.parts), reverse=True):  # the deepest first
            if not any(directory.iterdir()):
                directory.rmdir()

    def give_back(self, folder: Path, entries: tuple[FileEntry, ...]) -> None:
        """After a moving import failed: each file the store took is a copy of its own again,
        under its name, with its content and mode."""
        for entry in entries:
            path, blob = folder / entry.path, self._blob_path(entry.sha256)
            if path.is_file() and not path.is_symlink() and blob.exists() and path.samefile(blob):
                copy = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
                shutil.copy2(path, copy)
                copy.replace(path)

    def _blob_path(self, sha: str) -> Path:
        return self._blobs / sha

    def _remove_stale_staging(self) -> None:
        for entry in self._staging.iterdir():
            pid = entry.name.split("-", 1)[0]
            if not pid.isdigit() or not _is_alive(int(pid)):
                _remove(entry)


def _can_take(source: Path) -> bool:
    """A plain file that no other name shares (a link would let it be written later)."""
    status = source.lstat()
    return stat.S_ISREG(status.st_mode) and status.st_nlink == 1


def _linked(source: Path, staged: Path) -> bool:
    """`source` linked at `staged`, its data on disk; False on another filesystem (EXDEV) or one
    without hard links."""
    try:
        os.link(source, staged, follow_symlinks=False)
    except OSError:
        return False
    with open(staged, "rb") as reader:
        os.fsync(reader.fileno())  # the writer's data may still be in the page cache only
    return True


def _copied_sha256(source: Path, staged: Path, bar: tqdm) -> str:
    digest = hashlib.sha256()
    with open(source, "rb") as reader, open(staged, "wb") as writer:
        while chunk := reader.read(CHUNK_BYTES):
            digest.update(chunk)
            writer.write(chunk)
            bar.update(len(chunk))
        writer.flush()
        os.fsync(writer.fileno())
    return digest.hexdigest()


def file_sha256(path: Path, bar: tqdm | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as reader:
        while chunk := reader.read(CHUNK_BYTES):
            digest.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return digest.hexdigest()


def _remove_unlisted(folder: Path, keep: set[str]) -> int:
    doomed = [p for p in folder.iterdir() if p.name not in keep]
    for path in doomed:
        _remove(path)
    return len(doomed)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, it is someone else's
    return True
