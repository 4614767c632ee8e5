"""The conversations' SQLite store: items in the order added, ids unique, owners apart."""

import pytest

from models.errors import InvalidRequestError, NotFoundError
from server.api.conversation_store import ConversationStore


def _item(item_id: str) -> dict:
    return {"type": "message", "id": item_id, "role": "user", "content": [{"type": "input_text", "text": item_id}]}


def test_items_keep_the_order_they_were_added_in(tmp_path):
    store = ConversationStore(tmp_path / "state.db")
    made = store.create("app", [_item("a"), _item("b")], {})
    store.add("app", made["id"], [_item("c")])
    store.delete_item("app", made["id"], "b")
    store.add("app", made["id"], [_item("d")])
    assert [item["id"] for item in store.items("app", made["id"])] == ["a", "c", "d"]


def test_an_id_the_conversation_has_is_refused_with_nothing_added(tmp_path):
    store = ConversationStore(tmp_path / "state.db")
    made = store.create("app", [_item("a")], {})
    with pytest.raises(InvalidRequestError, match="a would be there twice"):
        store.add("app", made["id"], [_item("b"), _item("a")])
    with pytest.raises(InvalidRequestError, match="c would be there twice"):
        store.add("app", made["id"], [_item("c"), _item("c")])
    assert [item["id"] for item in store.items("app", made["id"])] == ["a"]


def test_another_owner_finds_nothing_and_a_deleted_conversation_takes_its_items(tmp_path):
    store = ConversationStore(tmp_path / "state.db")
    made = store.create("app", [_item("a")], {"k": "v"})
    with pytest.raises(NotFoundError):
        store.items("intruder", made["id"])
    with pytest.raises(NotFoundError):
        store.delete("intruder", made["id"])
    assert ConversationStore(tmp_path / "state.db").get("app", made["id"]) == made  # reopened: kept
    store.delete("app", made["id"])
    with pytest.raises(NotFoundError):
        store.items("app", made["id"])
    again = store.create("app", [_item("a")], {})  # the deleted one's item ids are free again
    assert [item["id"] for item in store.items("app", again["id"])] == ["a"]
