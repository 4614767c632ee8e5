"""`baton models ...` in real processes: crashes, races, the hub offline, the admin API."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from models.catalog import Change
from models.registry import Registry
from server.config.settings import ModelSpec, Settings
from tests.unit.test_lora import write_adapter
from tests.conftest import ServerThread

REVISION = "0123456789abcdef0123456789abcdef01234567"


def baton(home: Path, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "server.cli.main", "--home", str(home), *args]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def folder(tmp_path, tiny_model_path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_path, copy)
    return copy


@pytest.mark.parametrize("fault_point", ["after_blobs", "after_tree"])
def test_import_killed_mid_way_leaves_no_version_and_is_cleaned(tmp_path, folder, fault_point):
    home = tmp_path / "home"
    killed = baton(home, "models", "import", str(folder), "--name", "chat", env={"BATON_FAULT_POINT": fault_point}, check=False)
    assert killed.returncode == -9
    registry = Registry(home)  # opening cleans the dead process's staging files
    assert registry.model_names() == []
    assert list((home / "store" / "staging").iterdir()) == []
    registry.collect_garbage()
    assert list((home / "store" / "blobs" / "sha256").iterdir()) == []
    baton(home, "models", "import", str(folder), "--name", "chat")
    assert Registry(home).verify("chat@1", Change("tester"))[1] == []


def test_concurrent_imports_of_the_same_content_make_one_version(tmp_path, folder):
    home = tmp_path / "home"
    Registry(home)  # create the catalog before the race
    command = [sys.executable, "-m", "server.cli.main", "--home", str(home), "models", "import", str(folder), "--name", "chat"]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(3)]
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    assert [v.ref for v in Registry(home).versions("chat")] == ["chat@1"]


def test_hub_import_from_an_offline_cache_records_the_revision(tmp_path, folder):
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny" / "snapshots" / REVISION
    shutil.copytree(folder, snapshot)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text(REVISION)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    home = tmp_path / "home"
    (snapshot / "training_args.bin").write_bytes(b"pickle")  # what many hub repositories ship beside safetensors
    (snapshot / "README.md").write_text("a model card")
    baton(home, "models", "import", "hf:acme/tiny@main", "--name", "smol", env=env)  # no --allow-pickle needed
    shown = json.loads(baton(home, "models", "show", "smol@1").stdout)
    assert shown["manifest"]["source"] == {"kind": "hub", "repo": "acme/tiny", "revision": "main", "resolved_revision": REVISION}
    assert not {f["path"] for f in shown["manifest"]["files"]} & {"training_args.bin", "README.md"}
    missing = baton(home, "models", "import", "hf:acme/tiny@nope", "--name", "smol", env=env, check=False)
    assert missing.returncode == 1 and "Cannot fetch acme/tiny at nope" in missing.stderr


def test_cli_tour_import_alias_verify_rm_gc_history(tmp_path, folder):
    home = tmp_path / "home"
    assert "No models yet: `baton models import" in baton(home, "models", "list").stdout
    assert "imported chat@1" in baton(home, "models", "import", str(folder), "--name", "chat", "--label", "team=a").stdout
    (folder / "notes.txt").write_text("v2")
    assert "imported chat@2" in baton(home, "models", "import", str(folder), "--name", "chat").stdout
    assert "already present as chat@2" in baton(home, "models", "import", str(folder), "--name", "chat").stdout
    baton(home, "models", "alias", "chat", "2", "prod", "--reason", "release")
    listing = baton(home, "models", "list").stdout
    assert "prod,latest" in listing and "chat" in listing
    assert "verified" in baton(home, "models", "verify", "chat@prod").stdout
    refused = baton(home, "models", "rm", "chat@2", check=False)
    assert refused.returncode == 1 and "alias prod" in refused.stderr and "Traceback" not in refused.stderr
    baton(home, "models", "rm", "chat@1")
    assert "freed_bytes" in baton(home, "models", "gc").stdout
    history = baton(home, "models", "history", "chat").stdout
    assert history.count("register") == 2 and "alias" in history and "(release)" in history and "delete" in history


def test_cli_unknown_model_is_a_clear_error(tmp_path):
    result = baton(tmp_path / "home", "models", "show", "ghost@1", check=False)
    assert result.returncode == 1
    assert "no model 'ghost'" in result.stderr and "Traceback" not in result.stderr


def test_a_file_that_is_not_gguf_is_refused_without_a_traceback(tmp_path, folder):
    refused = baton(tmp_path / "home", "models", "import", f"gguf:{folder / 'config.json'}", "--name", "chat", check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "Cannot convert config.json" in refused.stderr and "not a GGUF file" in refused.stderr


def test_serve_refuses_bad_settings_in_one_line_each(tmp_path, tiny_model_path):
    home = tmp_path / "home"
    bounds = baton(home, "serve", "--model", str(tiny_model_path), "--port", "99999", "--drain-timeout", "-1", check=False)
    assert bounds.returncode == 1 and "Traceback" not in bounds.stderr
    assert bounds.stderr.splitlines() == ["baton: error: port: Input should be less than or equal to 65535", "baton: error: drain_timeout_s: Input should be greater than 0"]
    shared = baton(home, "serve", "--model", str(tiny_model_path), "--api-key", "same", "--admin-key", "same", check=False)
    assert shared.returncode == 1 and "the keys 'api-key' and 'admin-key' have the same secret" in shared.stderr


def test_cli_verify_reports_corruption_with_exit_1(tmp_path, folder):
    home = tmp_path / "home"
    baton(home, "models", "import", str(folder), "--name", "chat")
    weights = Registry(home).resolve("chat").path / "config.json"
    weights.chmod(0o644)
    weights.write_text(weights.read_text().replace("2", "3", 1))
    result = baton(home, "models", "verify", "chat@1", check=False)
    assert result.returncode == 1 and "CORRUPT" in result.stdout
    refused = baton(home, "serve", "--model", "chat@1", check=False)
    assert refused.returncode == 1 and "cannot be deployed" in refused.stderr


def test_admin_api_through_cli_server_mode(tmp_path, folder, tiny_model_path):
    home = tmp_path / "home"
    settings = Settings(home=home, import_roots=[tmp_path], models=[ModelSpec(name="tiny", path=tiny_model_path, engine="transformers")])
    with ServerThread(settings) as server:
        remote = ("models", "--server", server.url)
        assert "imported chat@1" in baton(tmp_path / "unused", *remote, "import", str(folder), "--name", "chat").stdout
        baton(tmp_path / "unused", *remote, "alias", "chat", "1", "prod")
        assert json.loads(baton(tmp_path / "unused", *remote, "show", "chat@prod").stdout)["version"] == 1
        history = baton(tmp_path / "unused", *remote, "history", "chat").stdout
        assert "via admin-api" in history
        adapter = write_adapter(tmp_path / "adapter", folder)
        assert "imported chat@2" in baton(tmp_path / "unused", *remote, "import", str(adapter), "--name", "chat", "--base", "chat@1").stdout
        assert json.loads(baton(tmp_path / "unused", *remote, "show", "chat@2").stdout)["manifest"]["source"]["base"] == "chat@1"
        assert "imported chat@3" in baton(tmp_path / "unused", *remote, "import", str(adapter), "--name", "chat", "--base", "chat@1", "--unmerged").stdout
        assert json.loads(baton(tmp_path / "unused", *remote, "show", "chat@3").stdout)["manifest"]["source"]["kind"] == "lora-unmerged"
        outside = baton(tmp_path / "unused", *remote, "import", "/etc", "--name", "etc", check=False)
        assert outside.returncode == 1 and "import root" in outside.stderr
        traversal = httpx.get(f"{server.url}/admin/models/..%2F..%2Fetc%2Fpasswd")
        assert traversal.status_code in (400, 404) and "error" in traversal.json()


def test_admin_api_import_does_not_follow_links_out_of_the_import_roots(tmp_path, folder, tiny_model_path):
    """A folder under an import root holding a link to a file elsewhere would copy that file
    into the registry; over HTTP the import is refused and nothing is stored. The operator's
    own CLI import follows links (a folder may link to a shared checkpoint)."""
    roots = tmp_path / "roots"
    (roots / "model").mkdir(parents=True)
    for file in folder.iterdir():
        shutil.copy(file, roots / "model" / file.name)
    secret = tmp_path / "elsewhere" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("not for the registry")
    (roots / "model" / "notes.txt").symlink_to(secret)
    (roots / "inside.txt").write_text("a file under the root")
    settings = Settings(home=tmp_path / "home", import_roots=[roots], models=[ModelSpec(name="tiny", path=tiny_model_path, engine="transformers")])
    with ServerThread(settings) as server:
        body = {"source": str(roots / "model"), "name": "chat"}
        refused = httpx.post(f"{server.url}/admin/models", json=body, timeout=60)
        assert refused.status_code == 403 and "outside the import roots" in refused.json()["error"]["message"]
        assert httpx.get(f"{server.url}/admin/models").json() == []
        (roots / "model" / "notes.txt").unlink()
        (roots / "model" / "notes.txt").symlink_to(roots / "inside.txt")
        accepted = httpx.post(f"{server.url}/admin/models", json=body, timeout=60)
        assert accepted.status_code == 200, accepted.text
    def notes_sha(ref: str) -> str:
        return next(f.sha256 for f in Registry(tmp_path / "home").resolve(ref).manifest.files if f.path == "notes.txt")

    assert notes_sha("chat@1") == hashlib.sha256(b"a file under the root").hexdigest()
    (roots / "model" / "notes.txt").unlink()
    (roots / "model" / "notes.txt").symlink_to(secret)
    baton(tmp_path / "home", "models", "import", str(roots / "model"), "--name", "linked")
    assert notes_sha("linked@1") == hashlib.sha256(b"not for the registry").hexdigest()


def test_a_training_loops_checkpoints_move_into_the_registry(tmp_path, folder, tiny_model_path):
    """`--move`, from the local CLI and through the admin API: each checkpoint folder leaves
    its place for the store, and the version it became verifies."""
    home = tmp_path / "home"
    moved = baton(home, "models", "import", str(folder), "--name", "chat", "--move")
    assert "imported chat@1" in moved.stdout and not folder.exists()
    refused = baton(home, "models", "import", "hf:org/model@main", "--name", "chat", "--move", check=False)
    assert refused.returncode == 1 and "move" in refused.stderr and "Traceback" not in refused.stderr
    checkpoint = tmp_path / "run" / "step-200"
    shutil.copytree(tiny_model_path, checkpoint)
    (checkpoint / "generation_config.json").write_text('{"temperature": 0.7}')
    settings = Settings(home=home, import_roots=[tmp_path / "run"], models=[ModelSpec(name="tiny", path=tiny_model_path, engine="transformers")])
    with ServerThread(settings) as server:
        remote = ("models", "--server", server.url)
        assert "imported chat@2" in baton(tmp_path / "unused", *remote, "import", str(checkpoint), "--name", "chat", "--move").stdout
    assert not checkpoint.exists() and (tmp_path / "run").is_dir()
    assert "verified" in baton(home, "models", "verify", "chat@2").stdout


def test_engine_options_are_checked_before_they_reach_a_manifest(tmp_path, folder):
    home = tmp_path / "home"
    options = ("--engine", "vllm", "--engine-option", "gpu_memory_utilization=0.45", "--engine-option", "quantization=awq")
    baton(home, "models", "import", str(folder), "--name", "chat", *options)
    recorded = Registry(home).resolve("chat@1").manifest.engine_options
    assert recorded == {"engine": "vllm", "gpu_memory_utilization": 0.45, "quantization": "awq"}
    unknown = baton(home, "models", "import", str(folder), "--name", "other", "--engine-option", "gpu_utilisation=0.5", check=False)
    assert unknown.returncode == 1 and "Unknown engine option(s) gpu_utilisation" in unknown.stderr
    wrong_type = baton(home, "models", "import", str(folder), "--name", "other", "--engine-option", "max_num_seqs=lots", check=False)
    assert wrong_type.returncode == 1 and "Invalid engine option max_num_seqs" in wrong_type.stderr
    smuggled = baton(home, "models", "import", str(folder), "--name", "other", "--engine-option", "allow_pickle=true", check=False)
    assert smuggled.returncode == 1 and "Unknown engine option(s) allow_pickle" in smuggled.stderr
    unreadable = baton(home, "models", "import", str(folder), "--name", "other", "--engine-option", "tool_parser=klingon", check=False)
    assert unreadable.returncode == 1 and "Unknown tool_parser 'klingon'" in unreadable.stderr
    baton(home, "models", "import", str(folder), "--name", "mistral", "--engine-option", "tool_parser=mistral")
    assert Registry(home).resolve("mistral@1").manifest.engine_options == {"tool_parser": "mistral"}
    assert Registry(home).model_names() == ["chat", "mistral"]


def test_admin_api_refuses_bad_engine_options_as_openai_errors(tmp_path, folder, tiny_model_path):
    settings = Settings(home=tmp_path / "home", import_roots=[tmp_path], models=[ModelSpec(name="tiny", path=tiny_model_path, engine="transformers")])
    with ServerThread(settings) as server:
        body = {"source": str(folder), "name": "chat", "engine_options": {"engine": "tensorrt"}}
        response = httpx.post(f"{server.url}/admin/models", json=body, timeout=60)
        assert response.status_code == 400 and response.json()["error"]["param"] == "engine_options.engine"


def test_admin_api_needs_the_admin_key_when_set(tmp_path, tiny_model_path):
    settings = Settings(home=tmp_path / "home", admin_key="k3y", models=[ModelSpec(name="tiny", path=tiny_model_path, engine="transformers")])
    with ServerThread(settings) as server:
        assert httpx.get(f"{server.url}/admin/models").status_code == 401
        assert httpx.get(f"{server.url}/admin/models", headers={"authorization": "Bearer k3y"}).json() == []


def test_the_local_cli_does_not_remove_a_version_a_saved_deployment_serves(tmp_path, folder):
    """A server saves in the registry what its deployments serve since a deploy or swap (to
    restore it after a restart); `baton models rm` on the same home, the server up or not,
    refuses to delete those versions unless forced: deleted, the restart would drop the deployment."""
    home = tmp_path / "home"
    baton(home, "models", "import", str(folder), "--name", "chat")
    (folder / "notes.txt").write_text("v2")
    baton(home, "models", "import", str(folder), "--name", "chat")
    version = Registry(home).resolve("chat@1")
    with ServerThread(Settings(home=home, models=[ModelSpec(name="chat", path=version.path, version=version.ref, engine="transformers")])) as server:
        swap = httpx.post(f"{server.url}/admin/deployments/chat/swap", json={"to": "chat@2"}, timeout=120).json()
        assert swap["status"] == "succeeded", swap
        refused = baton(home, "models", "rm", "chat@2", check=False)
    assert refused.returncode == 1 and "deployment chat (active)" in refused.stderr and "Traceback" not in refused.stderr
    assert baton(home, "models", "rm", "chat@2", check=False).returncode == 1  # stopped, the server would bring it back at its next start
    baton(home, "models", "rm", "chat@2", "--force")


def test_prune_through_the_admin_api_keeps_what_serves_and_frees_the_rest(tmp_path, folder):
    """`baton models --server URL prune`: a fine-tune loop's old versions go, with their files;
    the one a deployment serves stays, and a dry run names all of it first."""
    home = tmp_path / "home"
    for step in range(4):
        (folder / "notes.txt").write_text(f"checkpoint {step}")
        baton(home, "models", "import", str(folder), "--name", "chat")
    version = Registry(home).resolve("chat@1")
    with ServerThread(Settings(home=home, models=[ModelSpec(name="chat", path=version.path, version=version.ref, engine="transformers")])) as server:
        remote = ("models", "--server", server.url)
        preview = json.loads(baton(tmp_path / "unused", *remote, "prune", "chat", "--keep", "1", "--dry-run").stdout)
        assert preview == {"kept": ["chat@4"], "removed": ["chat@3", "chat@2"], "held": [{"ref": "chat@1", "held_by": ["deployment chat (active)"]}], "dry_run": True}
        done = json.loads(baton(tmp_path / "unused", *remote, "prune", "chat", "--keep", "1", "--reason", "nightly").stdout)
        assert done["removed"] == ["chat@3", "chat@2"] and done["removed_trees"] == 2
        assert [v.ref for v in Registry(home).versions("chat")] == ["chat@1", "chat@4"]
        assert server.client().chat.completions.create(model="chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=2).choices
        refused = baton(tmp_path / "unused", *remote, "prune", "chat", "--keep", "0", check=False)
        assert refused.returncode == 1 and "keep" in refused.stderr
