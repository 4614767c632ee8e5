"""OpenAI's Conversations API through the official client, against a real server on the
transformers engine: a conversation made with items, answered in by Responses (each answer
the one a stateless request with the whole conversation gets), its items listed, added,
read and deleted; its owner's alone; kept over a restart."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from server.auth.keys import key
from server.config.settings import ModelSpec, Settings
from tests.conftest import ServerThread
from tests.fake_engine import FakeEngineFactory

ASKED = dict(model="tiny", max_output_tokens=4, temperature=0)


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return tiny_server.client()


def _sent(item) -> dict:
    """A kept item as a client sends it back in `input`."""
    return item.model_dump(exclude_none=True, exclude={"id", "status"})


def test_answers_in_a_conversation_see_its_items_and_add_theirs(client):
    conversation = client.conversations.create(items=[{"role": "user", "content": "My name is Ada."}], metadata={"topic": "names"})
    assert (conversation.object, conversation.metadata) == ("conversation", {"topic": "names"})
    first = client.responses.create(**ASKED, conversation=conversation.id, input="What is my name?")
    assert first.conversation.id == conversation.id
    whole = [{"role": "user", "content": "My name is Ada."}, {"role": "user", "content": "What is my name?"}]
    assert first.output_text == client.responses.create(**ASKED, input=whole, store=False).output_text
    items = client.conversations.items.list(conversation.id, order="asc").data
    assert [(item.type, item.role) for item in items] == [("message", "user"), ("message", "user"), ("message", "assistant")]
    assert items[-1].id == first.output[0].id and items[-1].content[0].text == first.output_text
    second = client.responses.create(**ASKED, conversation={"id": conversation.id}, input="And again?")
    stateless = client.responses.create(**ASKED, input=[*whole, *[_sent(item) for item in first.output], {"role": "user", "content": "And again?"}], store=False)
    assert (second.output_text, second.usage.input_tokens) == (stateless.output_text, stateless.usage.input_tokens)
    assert len(client.conversations.items.list(conversation.id).data) == 5
    with pytest.raises(openai.BadRequestError) as repeated:  # an item the conversation has already, sent again
        client.responses.create(**ASKED, conversation=conversation.id, input=[{**_sent(items[0]), "id": items[0].id}])
    assert repeated.value.body["param"] == "input" and len(client.conversations.items.list(conversation.id).data) == 5


def test_a_background_answer_adds_its_items_when_it_ends(client):
    conversation = client.conversations.create()
    started = client.responses.create(**ASKED, conversation=conversation.id, input="Hello there", background=True)
    deadline = time.monotonic() + 30
    while (ended := client.responses.retrieve(started.id)).status == "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    items = client.conversations.items.list(conversation.id, order="asc").data
    assert [item.role for item in items] == ["user", "assistant"] and items[1].id == ended.output[0].id


def test_items_are_added_read_paged_and_deleted(client):
    conversation = client.conversations.create()
    added = client.conversations.items.create(conversation.id, items=[{"role": "user", "content": f"turn {n}"} for n in range(3)])
    assert [item.content[0].text for item in added.data] == ["turn 0", "turn 1", "turn 2"]
    newest = client.conversations.items.list(conversation.id, limit=2)
    assert [item.content[0].text for item in newest.data] == ["turn 2", "turn 1"] and newest.has_more
    rest = client.conversations.items.list(conversation.id, limit=2, after=newest.last_id)
    assert [item.content[0].text for item in rest.data] == ["turn 0"] and not rest.has_more
    middle = added.data[1].id
    assert client.conversations.items.retrieve(middle, conversation_id=conversation.id).content[0].text == "turn 1"
    assert client.conversations.items.delete(middle, conversation_id=conversation.id).id == conversation.id
    assert [item.content[0].text for item in client.conversations.items.list(conversation.id, order="asc").data] == ["turn 0", "turn 2"]
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.retrieve(middle, conversation_id=conversation.id)


def test_a_conversation_is_updated_and_deleted(client):
    conversation = client.conversations.create(metadata={"a": "1"})
    assert client.conversations.update(conversation.id, metadata={"b": "2"}).metadata == {"b": "2"}
    assert client.conversations.retrieve(conversation.id).metadata == {"b": "2"}
    deleted = client.conversations.delete(conversation.id)
    assert (deleted.id, deleted.deleted) == (conversation.id, True)
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conversation.id)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.responses.create(**ASKED, conversation=conversation.id, input="hi")
    assert unknown.value.body["param"] == "conversation"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/responses", {**ASKED, "input": "hi", "conversation": "conv_x", "previous_response_id": "resp_x"}, "conversation"),
        ("/v1/conversations", {"metadata": {f"k{n}": "v" for n in range(17)}}, "metadata"),
        ("/v1/conversations", {"items": [{"role": "user", "content": "hi"}] * 21}, "items"),
        ("/v1/conversations", {"items": [{"role": "user", "content": "hi", "id": "msg_1"}, {"role": "user", "content": "again", "id": "msg_1"}]}, "items"),
    ],
)
def test_bad_conversation_requests_are_400s_naming_the_field(tiny_server, path, body, param):
    refused = httpx.post(f"{tiny_server.url}{path}", json=body, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == param, refused.text


def test_a_conversation_is_its_owners_alone_and_outlives_a_restart(tiny_model_path, tmp_path):
    keys = [key("app", "app-secret", {"inference"}), key("intruder", "intruder-secret", {"inference"})]
    settings = Settings(home=tmp_path / "home", models=[ModelSpec(name="chat", path=tiny_model_path)], keys=keys)
    with ServerThread(settings, engine_factory=FakeEngineFactory()) as server:
        made = server.client(api_key="app-secret").conversations.create(items=[{"role": "user", "content": "hi"}])
    with ServerThread(settings, engine_factory=FakeEngineFactory()) as server:
        assert len(server.client(api_key="app-secret").conversations.items.list(made.id).data) == 1
        intruder = server.client(api_key="intruder-secret")
        for attempt in (lambda: intruder.conversations.retrieve(made.id), lambda: intruder.conversations.items.list(made.id), lambda: intruder.conversations.delete(made.id)):
            with pytest.raises(openai.NotFoundError):
                attempt()
        with pytest.raises(openai.NotFoundError):
            intruder.responses.create(model="chat", input="hi", max_output_tokens=2, conversation=made.id)


def test_a_server_that_keeps_nothing_serves_no_conversations(tiny_model_path, tmp_path):
    settings = Settings(home=tmp_path / "home", models=[ModelSpec(name="chat", path=tiny_model_path)], store_responses=False)
    with ServerThread(settings, engine_factory=FakeEngineFactory()) as server:
        assert httpx.post(f"{server.url}/v1/conversations", json={}, timeout=30).status_code == 404
        refused = httpx.post(f"{server.url}/v1/responses", json={"model": "chat", "input": "hi", "conversation": "conv_x"}, timeout=30)
        assert (refused.status_code, refused.json()["error"]["param"]) == (400, "conversation")


def test_past_its_kept_bytes_a_key_loses_its_oldest_responses_and_cannot_grow_its_conversations(tiny_model_path, tmp_path):
    keys = [key("app", "app-secret", {"inference"})]
    settings = Settings(home=tmp_path / "home", models=[ModelSpec(name="chat", path=tiny_model_path)], keys=keys, max_kept_bytes_per_key=12_000)
    with ServerThread(settings, engine_factory=FakeEngineFactory()) as server:
        client = server.client(api_key="app-secret")
        made = [client.responses.create(model="chat", input="hi", max_output_tokens=2) for _ in range(12)]
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(made[0].id)  # the oldest went to make room
        assert client.responses.retrieve(made[-1].id).id == made[-1].id
        conversation = client.conversations.create(items=[{"type": "message", "role": "user", "content": "y" * 11_000}])
        with pytest.raises(openai.BadRequestError) as refused:
            client.conversations.items.create(conversation.id, items=[{"type": "message", "role": "user", "content": "z" * 2_000}])
        assert refused.value.code == "storage_limit_exceeded"
        assert len(client.conversations.items.list(conversation.id).data) == 1
