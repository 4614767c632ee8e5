"""A key's kept bytes (kept_space.py) on a real SQLite file shared by the three stores: the
count follows every write, delete and expiry; past the cap the oldest Responses and
completions go, a running background Response and conversations stay; a database from
before the count is counted when opened."""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing

import pytest

from models.database import reading
from models.errors import InvalidRequestError, NotFoundError
from server.api.completion_store import CompletionStore
from server.api.conversation_store import ConversationStore
from server.api.kept_space import bytes_kept
from server.api.response_store import ResponseStore


def _response(response_id: str, text: str = "Hi", status: str = "completed") -> dict:
    return {"id": response_id, "object": "response", "status": status, "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}]}


def _completion(completion_id: str) -> dict:
    return {"id": completion_id, "object": "chat.completion", "model": "chat", "created": 1, "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hé"}}]}


def _stores(path, ttl_s: float = 60, cap: int | None = None):
    return ResponseStore(path, ttl_s, cap), CompletionStore(path, ttl_s, cap), ConversationStore(path, cap)


def _counted(path, owner: str) -> int:
    with reading(path) as db:
        return bytes_kept(db, owner)


def _bytes_on_disk(path, owner: str) -> int:
    """The owner's rows' bytes, summed the slow way."""
    with reading(path) as db:
        (responses,) = db.execute("SELECT COALESCE(SUM(length(CAST(response AS BLOB)) + length(CAST(input_items AS BLOB))), 0) FROM responses WHERE owner = ?", (owner,)).fetchone()
        (completions,) = db.execute("SELECT COALESCE(SUM(length(CAST(completion AS BLOB)) + length(CAST(messages AS BLOB))), 0) FROM chat_completions WHERE owner = ?", (owner,)).fetchone()
        (items,) = db.execute(
            "SELECT COALESCE(SUM(length(CAST(item AS BLOB))), 0) FROM conversation_items JOIN conversations ON conversations.id = conversation_id WHERE owner = ?", (owner,)
        ).fetchone()
    return responses + completions + items


def test_the_count_follows_every_write_change_delete_and_expiry(tmp_path):
    path = tmp_path / "responses.db"
    responses, completions, conversations = _stores(path, ttl_s=0.2)
    responses.keep("app", _response("resp_1", status="in_progress"), [{"role": "user", "content": "née"}])
    responses.keep("app", _response("resp_1", "Hello, a longer answer"), [{"role": "user", "content": "née"}])  # the background one, ended
    completions.keep("app", _completion("chatcmpl-1"), [{"role": "user", "content": "hi"}])
    completions.update("app", "chatcmpl-1", {"topic": "greeting"})
    made = conversations.create("app", [{"id": "msg_1", "type": "message", "role": "user", "content": "hi"}], {})
    conversations.add("app", made["id"], [{"id": "msg_2", "type": "message", "role": "assistant", "content": "hello"}])
    responses.keep("other", _response("resp_2"), [])
    assert _counted(path, "app") == _bytes_on_disk(path, "app") > 0
    assert _counted(path, "other") == _bytes_on_disk(path, "other") > 0
    conversations.delete_item("app", made["id"], "msg_1")
    responses.delete("app", "resp_1")
    assert _counted(path, "app") == _bytes_on_disk(path, "app") > 0
    conversations.delete("app", made["id"])
    time.sleep(0.3)
    responses.keep("later", _response("resp_3"), [])  # a write takes the expired rows away
    completions.keep("later", _completion("chatcmpl-2"), [])
    assert _counted(path, "app") == _bytes_on_disk(path, "app") == 0
    assert _counted(path, "other") == 0


def test_past_its_cap_a_key_loses_its_oldest_responses_and_completions_first(tmp_path):
    path = tmp_path / "responses.db"
    responses, completions, _ = _stores(path, cap=4000)
    responses.keep("app", _response("resp_running", status="in_progress"), [])
    for index in range(12):
        responses.keep("app", _response(f"resp_{index}", "x" * 200), [])
        completions.keep("app", _completion(f"chatcmpl-{index}"), [])
    responses.keep("other", _response("resp_other"), [])
    assert _counted(path, "app") == _bytes_on_disk(path, "app") <= 4000
    assert responses.get("app", "resp_11") and completions.get("app", "chatcmpl-11")  # the newest stay
    for gone in (lambda: responses.get("app", "resp_0"), lambda: completions.get("app", "chatcmpl-0")):
        with pytest.raises(NotFoundError):
            gone()
    assert responses.get("app", "resp_running").response["status"] == "in_progress"  # still going: never dropped
    assert responses.get("other", "resp_other")  # another key's are its own


def test_a_conversation_write_past_the_cap_is_refused_whole_once_nothing_else_can_go(tmp_path):
    path = tmp_path / "responses.db"
    responses, _, conversations = _stores(path, cap=2000)
    responses.keep("app", _response("resp_1"), [])
    made = conversations.create("app", [{"id": "msg_1", "type": "message", "role": "user", "content": "y" * 1900}], {})
    with pytest.raises(NotFoundError):
        responses.get("app", "resp_1")  # dropped to make room
    with pytest.raises(InvalidRequestError) as refused:
        conversations.add("app", made["id"], [{"id": "msg_2", "type": "message", "role": "user", "content": "z" * 100}])
    assert refused.value.code == "storage_limit_exceeded"
    assert [item["id"] for item in conversations.items("app", made["id"])] == ["msg_1"]
    with pytest.raises(InvalidRequestError):
        conversations.create("app", [{"id": "msg_3", "type": "message", "role": "user", "content": "z" * 100}], {})
    assert _counted(path, "app") == _bytes_on_disk(path, "app")


def test_rows_kept_before_the_count_existed_are_counted_when_the_stores_open(tmp_path):
    path = tmp_path / "responses.db"
    with closing(sqlite3.connect(path)) as db, db:  # a database as an earlier baton left it: the tables, no count
        db.execute("CREATE TABLE responses (id TEXT PRIMARY KEY, owner TEXT NOT NULL, status TEXT NOT NULL, expires_at REAL NOT NULL, response TEXT NOT NULL, input_items TEXT NOT NULL)")
        db.execute("INSERT INTO responses VALUES ('resp_old', 'app', 'completed', ?, ?, '[]')", (time.time() + 60, json.dumps(_response("resp_old", "olá"), ensure_ascii=False)))
    _stores(path)
    _stores(path)  # opened again (a restart): counted once
    assert _counted(path, "app") == _bytes_on_disk(path, "app") > 0
