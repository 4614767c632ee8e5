"""The registry on disk: real files, real SQLite, real hashes."""

from __future__ import annotations

import os
import re
import shutil
import struct
from pathlib import Path

import pytest

from models.catalog import Change
from models.names import ModelRef
from models.registry import ImportOptions, Registry
from models.errors import ConflictError, CorruptVersionError, InvalidRequestError, ModelLoadError, NotFoundError

OPERATOR = Change("tester", "test")
LOCAL = {"kind": "local"}


@pytest.fixture
def registry(tmp_path) -> Registry:
    return Registry(tmp_path / "home")


@pytest.fixture
def folder(tmp_path, tiny_model_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_path, copy)
    return copy


def _import(registry, folder, name="chat", **options):
    return registry.import_folder(folder, name, LOCAL, ImportOptions(**options), OPERATOR)


def test_registry_import_makes_numbered_versions_and_dedupes(registry, folder):
    first, is_new = _import(registry, folder)
    assert (first.ref, is_new) == ("chat@1", True)
    again, is_new = _import(registry, folder)
    assert (again.ref, is_new) == ("chat@1", False)
    (folder / "generation_config.json").write_text('{"temperature": 0.5}')
    second, _ = _import(registry, folder)
    assert second.ref == "chat@2"
    assert registry.resolve("chat").number == 2  # latest
    shared = {f.sha256 for f in first.manifest.files} & {f.sha256 for f in second.manifest.files}
    num_blobs = len(list((registry.home / "store" / "blobs" / "sha256").iterdir()))
    assert num_blobs == len(first.manifest.files) + len(second.manifest.files) - len(shared)


def test_registry_version_folder_is_a_loadable_copy(registry, folder):
    version, _ = _import(registry, folder)
    assert (version.path / "config.json").read_bytes() == (folder / "config.json").read_bytes()
    manifest = version.manifest
    assert manifest.architecture == "LlamaForCausalLM"
    assert manifest.num_parameters > 3_000_000
    assert manifest.tokenizer_sha256 and manifest.chat_template_sha256
    assert manifest.total_bytes == sum((folder / f.path).stat().st_size for f in manifest.files)


def test_registry_same_content_under_two_names_shares_storage(registry, folder):
    one, _ = _import(registry, folder, "one")
    two, _ = _import(registry, folder, "two")
    assert one.path == two.path and one.ref != two.ref


def test_registry_alias_moves_are_recorded(registry, folder):
    _import(registry, folder)
    (folder / "extra.txt").write_text("v2")
    _import(registry, folder)
    registry.set_alias("chat", "1", "prod", OPERATOR)
    registry.set_alias("chat", "2", "prod", Change("alice", "promote"))
    assert registry.resolve("chat@prod").number == 2
    moves = [e for e in registry.history("chat") if e["action"] == "alias"]
    assert [(m["version"], m["details"]["previous"], m["actor"]) for m in moves] == [(1, None, "tester"), (2, 1, "alice")]
    assert moves[-1]["reason"] == "promote"


def test_registry_refuses_reserved_aliases(registry, folder):
    _import(registry, folder)
    for bad in ("latest", "7"):
        with pytest.raises(InvalidRequestError):
            registry.set_alias("chat", "1", bad, OPERATOR)


def test_registry_unknown_model_and_version_are_404_with_known_names(registry, folder):
    _import(registry, folder)
    with pytest.raises(NotFoundError, match="Known models: chat"):
        registry.resolve("nope")
    with pytest.raises(NotFoundError, match="Versions: 1"):
        registry.resolve("chat@9")


@pytest.mark.parametrize("name", ["../etc", "a/b", "UPPER", "", ".hidden", "x" * 65, "a..b"])
def test_registry_refuses_unsafe_names(registry, folder, name):
    with pytest.raises(InvalidRequestError):
        _import(registry, folder, name)


@pytest.mark.parametrize("ref", ["chat@../../etc", "../chat", "chat@a/b"])
def test_registry_refuses_unsafe_refs(ref):
    with pytest.raises(InvalidRequestError):
        ModelRef.parse(ref)


def test_registry_refuses_pickle_unless_allowed(registry, folder):
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        _import(registry, folder)
    assert registry.model_names() == []
    version, _ = _import(registry, folder, allow_pickle=True)
    assert version.manifest.allows_pickle


def test_registry_refuses_remote_code_unless_trusted(registry, folder):
    (folder / "modeling_custom.py").write_text("print('hi')")
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        _import(registry, folder)
    assert _import(registry, folder, trust_remote_code=True)[0].manifest.trusts_remote_code


@pytest.mark.parametrize(
    ("file", "content", "words"),
    [
        ("config.json", b"{not json", "config.json is not valid JSON"),
        ("config.json", b"[1, 2]", "config.json must hold a JSON object"),
        ("model.safetensors", struct.pack("<Q", 2**50) + b"{}", "its header claims 1125899906842624 bytes"),
        ("model.safetensors", struct.pack("<Q", 2) + b"[]", "model.safetensors is not a valid safetensors file"),
        ("model.safetensors", b"abc", "model.safetensors is not a valid safetensors file"),
    ],
)
def test_registry_refuses_unreadable_files_before_storing_anything(registry, folder, file, content, words):
    """A bad file is a 400-class ModelLoadError naming it (it was a traceback, a 500 over
    the admin API), and no blob is stored for gc to find."""
    (folder / file).write_bytes(content)
    with pytest.raises(ModelLoadError, match=re.escape(words)):
        _import(registry, folder)
    assert not list((registry.home / "store" / "blobs" / "sha256").glob("*"))
    with pytest.raises(NotFoundError):
        registry.resolve("chat")


def test_registry_verify_detects_a_flipped_byte_and_refuses_serving(registry, folder):
    version, _ = _import(registry, folder)
    assert registry.verify("chat@1", OPERATOR)[1] == []
    weights = version.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.chmod(0o644)
    weights.write_bytes(bytes(data))
    checked, problems = registry.verify("chat@1", OPERATOR)
    assert checked.is_corrupt and problems == ["model.safetensors does not match its sha256"]
    with pytest.raises(CorruptVersionError, match="cannot be deployed"):
        registry.resolve_for_serving("chat@1")


def test_registry_size_check_on_load_marks_a_truncated_version(registry, folder):
    version, _ = _import(registry, folder)
    weights = version.path / "model.safetensors"
    weights.chmod(0o644)
    with open(weights, "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(CorruptVersionError, match="model.safetensors has 100 bytes"):
        registry.resolve_for_serving("chat")
    assert registry.resolve("chat").is_corrupt


def test_registry_remove_refuses_aliased_versions_unless_forced(registry, folder):
    _import(registry, folder)
    registry.set_alias("chat", "1", "prod", OPERATOR)
    with pytest.raises(ConflictError, match="alias prod"):
        registry.remove("chat@1", OPERATOR)
    registry.remove("chat@1", OPERATOR, force=True)
    with pytest.raises(NotFoundError):
        registry.resolve("chat")
    assert [e["action"] for e in registry.history("chat")] == ["register", "alias", "delete"]


def test_registry_never_gives_a_deleted_versions_number_to_other_content(registry, folder):
    _import(registry, folder)
    (folder / "generation_config.json").write_text('{"temperature": 0.5}')
    deleted, _ = _import(registry, folder)
    registry.remove(deleted.ref, OPERATOR)
    (folder / "generation_config.json").write_text('{"temperature": 0.7}')
    assert _import(registry, folder)[0].ref == "chat@3"  # chat@2 meant other weights
    (folder / "generation_config.json").write_text('{"temperature": 0.5}')
    assert _import(registry, folder)[0].ref == "chat@4"  # the deleted content again: a new version
    assert [v.number for v in registry.versions("chat")] == [1, 3, 4]


def test_registry_gc_removes_only_unreferenced_files(registry, folder):
    keep, _ = _import(registry, folder, "keep")
    (folder / "extra.txt").write_text("only in the doomed version")
    doomed, _ = _import(registry, folder, "doomed")
    registry.remove("doomed@1", OPERATOR)
    report = registry.collect_garbage()
    assert report["removed_blobs"] == 1 and report["removed_trees"] == 1
    assert keep.path.is_dir() and not doomed.path.exists()
    assert registry.verify("keep@1", OPERATOR)[1] == []


def test_prune_keeps_the_newest_and_every_held_version_and_deletes_the_rest(registry, folder):
    """A checkpoint loop's versions: chat@1..6; prod points at 2, a deployment serves 3."""
    for temperature in range(6):
        (folder / "generation_config.json").write_text(f'{{"temperature": 0.{temperature}}}')
        _import(registry, folder)
    registry.set_alias("chat", "2", "prod", OPERATOR)
    serving = {"chat@3": ["deployment chat (active)"]}
    preview = registry.prune("chat", 2, OPERATOR, lambda ref: serving.get(ref, []), dry_run=True)
    assert [v.ref for v in preview.kept] == ["chat@6", "chat@5"] and [v.ref for v in preview.removed] == ["chat@4", "chat@1"]
    assert [(v.ref, held) for v, held in preview.held] == [("chat@3", ["deployment chat (active)"]), ("chat@2", ["alias prod"])]
    assert [v.number for v in registry.versions("chat")] == [1, 2, 3, 4, 5, 6]  # a dry run deletes nothing
    registry.prune("chat", 2, OPERATOR, lambda ref: serving.get(ref, []))
    assert [v.number for v in registry.versions("chat")] == [2, 3, 5, 6]
    assert [e["action"] for e in registry.history("chat")].count("delete") == 2
    with pytest.raises(InvalidRequestError, match="keep"):
        registry.prune("chat", 0, OPERATOR, lambda ref: [])


def _weights_of(folder: Path) -> Path:
    return next(folder.glob("*.safetensors"))


def test_a_moving_import_links_the_files_into_the_store_and_empties_the_folder(registry, folder):
    """`move`: no byte copied (the blob is the file itself), the folder gone as mv leaves it,
    and the version whole (verified) and read-only."""
    (folder / "extra" / "deeper").mkdir(parents=True)
    (folder / "extra" / "deeper" / "notes.txt").write_text("kept with the version")
    weights_inode = _weights_of(folder).stat().st_ino
    version, _ = _import(registry, folder, move=True)
    assert not folder.exists()
    stored = _weights_of(version.path)
    assert stored.stat().st_ino == weights_inode and stored.stat().st_nlink == 2  # its blob and its tree
    assert not stored.stat().st_mode & 0o222
    assert (version.path / "extra" / "deeper" / "notes.txt").read_text() == "kept with the version"
    assert registry.verify("chat@1", OPERATOR)[1] == []


def test_a_moving_import_copies_a_file_that_another_name_shares(registry, folder, tmp_path):
    """A file with a second name (a hard link, a symlink's target) could be written through
    it later, into a blob: it is copied, and that other name keeps its file."""
    outside = tmp_path / "outside"
    outside.mkdir()
    weights = _weights_of(folder)
    os.link(weights, outside / "weights.safetensors")
    shutil.move(folder / "config.json", outside / "config.json")
    (folder / "config.json").symlink_to(outside / "config.json")
    version, _ = _import(registry, folder, move=True)
    assert not folder.exists()
    for kept in ("weights.safetensors", "config.json"):
        assert (outside / kept).stat().st_ino not in {path.stat().st_ino for path in version.path.iterdir()}
    assert (outside / "weights.safetensors").stat().st_nlink == 1 and (outside / "config.json").read_text()
    assert registry.verify("chat@1", OPERATOR)[1] == []


def test_a_moving_import_that_fails_leaves_the_folder_as_it_was(registry, folder, monkeypatch):
    """Content and mode as they were, and no file one with a blob (written later, it would
    change what a copying import of the same content then shares)."""

    def files() -> dict:
        return {path.name: (path.read_bytes(), path.stat().st_mode, path.stat().st_nlink) for path in folder.iterdir()}

    def refuse(*args):
        raise ConflictError("the catalog refused it")

    before = files()
    monkeypatch.setattr(registry._catalog, "add_version", refuse)
    with pytest.raises(ConflictError):
        _import(registry, folder, move=True)
    assert files() == before and {nlink for _, _, nlink in before.values()} == {1}
    monkeypatch.undo()
    version, _ = _import(registry, folder)  # copied, onto the blobs the failed import left
    assert not any(path.stat().st_mode & 0o222 for path in version.path.iterdir())
    assert _import(registry, folder, move=True)[0].ref == "chat@1" and not folder.exists()


def test_move_is_refused_where_there_is_no_model_folder_to_take(registry, folder, tmp_path):
    from models.importers import import_source
    from tests.unit.test_lora import write_adapter

    for source in ("hf:org/model@main", f"gguf:{tmp_path / 'model.gguf'}"):
        with pytest.raises(InvalidRequestError, match="move") as refused:
            import_source(registry, source, "chat", ImportOptions(move=True), OPERATOR)
        assert refused.value.param == "move"
    _import(registry, folder)
    adapter = write_adapter(tmp_path / "adapter", folder)
    with pytest.raises(InvalidRequestError, match="import it without move"):
        import_source(registry, str(adapter), "tuned", ImportOptions(move=True, base="chat@1"), OPERATOR)
    assert adapter.is_dir() and registry.model_names() == ["chat"]
