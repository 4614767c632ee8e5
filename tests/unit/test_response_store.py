"""The Responses kept on disk: real SQLite, expiry, owners."""

from __future__ import annotations

import sqlite3
import time
from contextlib import closing

import pytest

from models.errors import NotFoundError
from server.api.response_store import ResponseStore


def _response(response_id: str, text: str = "Hi") -> dict:
    return {"id": response_id, "object": "response", "status": "completed", "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}]}


def test_response_store_gives_a_response_back_to_its_owner_only(tmp_path):
    store = ResponseStore(tmp_path / "responses.db", ttl_s=60)
    store.keep("app", _response("resp_1", "Hello, Ada"), [{"type": "message", "role": "user", "content": "I am Ada"}])
    kept = ResponseStore(tmp_path / "responses.db", ttl_s=60).get("app", "resp_1")  # another store on the file: a restart
    assert kept.response == _response("resp_1", "Hello, Ada")
    assert [item["role"] for item in kept.conversation] == ["user", "assistant"]
    for owner, response_id in (("intruder", "resp_1"), ("app", "resp_2")):
        with pytest.raises(NotFoundError) as unknown:
            store.get(owner, response_id, param="previous_response_id")
        assert (unknown.value.param, unknown.value.code) == ("previous_response_id", "response_not_found")
    with pytest.raises(NotFoundError):
        store.delete("intruder", "resp_1")
    store.delete("app", "resp_1")
    with pytest.raises(NotFoundError):
        store.get("app", "resp_1")


def test_response_store_forgets_an_expired_response_and_removes_it_at_the_next_write(tmp_path):
    store = ResponseStore(tmp_path / "responses.db", ttl_s=0.05)
    store.keep("", _response("resp_old"), [])
    time.sleep(0.1)
    with pytest.raises(NotFoundError):
        store.get("", "resp_old")
    store.keep("", _response("resp_new"), [])
    with closing(sqlite3.connect(tmp_path / "responses.db")) as db:
        assert [row[0] for row in db.execute("SELECT id FROM responses")] == ["resp_new"]


def test_response_store_fails_a_response_that_a_stopped_server_left_unfinished(tmp_path):
    store = ResponseStore(tmp_path / "responses.db", ttl_s=60)
    store.keep("", {**_response("resp_cut"), "status": "in_progress", "background": True}, [])
    store.keep("", {**_response("resp_done"), "status": "completed"}, [])
    reopened = ResponseStore(tmp_path / "responses.db", ttl_s=60)  # the next start
    cut = reopened.get("", "resp_cut").response
    assert (cut["status"], cut["error"]["code"]) == ("failed", "server_error") and cut["background"] is True
    assert reopened.get("", "resp_done").response["status"] == "completed"
