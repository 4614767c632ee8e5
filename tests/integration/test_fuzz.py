"""schemathesis against baton's own /openapi.json (every /v1 and /admin operation, with a
key that has both scopes): over a thousand generated requests, and not one 5xx."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from server.config.settings import ModelSpec, Settings
from server.auth.keys import key
from tests.conftest import ServerThread
from tests.fake_engine import FakeEngineFactory


def test_no_generated_request_gets_a_server_error(tiny_model_path, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # generated hub imports must not reach for the network
    settings = Settings(home=tmp_path, models=[ModelSpec(name="chat", path=tiny_model_path)], keys=[key("fuzz", "fuzz-secret", {"inference", "admin"})])
    with ServerThread(settings, engine_factory=FakeEngineFactory()) as server:
        command = [str(Path(sys.executable).parent / "st"), "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error"]
        command += ["--max-examples", "15", "--seed", "1", "--header", "Authorization: Bearer fuzz-secret", "--phases", "examples,coverage,fuzzing"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    selected, total = re.search(r"Selected: (\d+)/(\d+)", result.stdout).groups()
    assert selected == total == re.search(r"Tested: (\d+)", result.stdout).group(1)  # every operation was exercised
