"""OpenAI's stored chat completions through the official client, against a real server on
the transformers engine: `store: true` keeps a completion (streamed or not) as it was
answered, with its messages and metadata; listed, filtered, updated, deleted; its key's alone."""

from __future__ import annotations

import openai
import pytest

from server.auth.keys import key
from server.config.settings import ModelSpec, Settings
from tests.conftest import ServerThread
from tests.fake_engine import FakeEngineFactory

ASKED = dict(model="tiny", max_tokens=4, temperature=0)


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return tiny_server.client()


def _messages(text: str) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


def test_a_stored_completion_reads_back_as_it_was_answered_with_its_messages(client):
    made = client.chat.completions.create(**ASKED, messages=_messages("Hello there"), store=True, metadata={"run": "a"})
    kept = client.chat.completions.retrieve(made.id)
    assert kept.model_dump(exclude={"metadata"}) == made.model_dump(exclude={"metadata"}) and kept.metadata == {"run": "a"}
    messages = client.chat.completions.messages.list(made.id).data
    assert [(m.role, m.content) for m in messages] == [("system", "Be brief."), ("user", "Hello there")] and all(m.id for m in messages)


def test_a_streamed_completion_is_kept_as_the_same_answer_whole(client):
    chunks = list(client.chat.completions.create(**ASKED, messages=_messages("Streamed"), store=True, stream=True))
    kept = client.chat.completions.retrieve(chunks[0].id)
    whole = client.chat.completions.create(**ASKED, messages=_messages("Streamed"))
    assert kept.choices[0].message.content == "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert kept.usage.completion_tokens == whole.usage.completion_tokens


def test_stored_completions_are_listed_filtered_updated_and_deleted(client):
    unstored = client.chat.completions.create(**ASKED, messages=_messages("Not kept"))
    first = client.chat.completions.create(**ASKED, messages=_messages("One"), store=True, metadata={"job": "listing"})
    second = client.chat.completions.create(**ASKED, messages=_messages("Two"), store=True, metadata={"job": "listing", "part": "2"})
    listed = [c.id for c in client.chat.completions.list(metadata={"job": "listing"})]
    assert listed == [first.id, second.id] and unstored.id not in listed
    assert [c.id for c in client.chat.completions.list(metadata={"part": "2"})] == [second.id]
    assert client.chat.completions.update(first.id, metadata={"job": "done"}).metadata == {"job": "done"}
    assert [c.id for c in client.chat.completions.list(metadata={"job": "listing"})] == [second.id]
    assert client.chat.completions.delete(second.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(second.id)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(unstored.id)


def test_a_stored_completion_is_its_keys_alone_and_a_server_that_keeps_nothing_says_so(tiny_model_path, tmp_path):
    keys = [key("app", "app-secret", {"inference"}), key("intruder", "intruder-secret", {"inference"})]
    settings = Settings(home=tmp_path / "home", models=[ModelSpec(name="chat", path=tiny_model_path)], keys=keys)
    with ServerThread(settings, engine_factory=FakeEngineFactory()) as server:
        made = server.client(api_key="app-secret").chat.completions.create(model="chat", messages=_messages("hi"), max_tokens=2, store=True)
        intruder = server.client(api_key="intruder-secret")
        for attempt in (lambda: intruder.chat.completions.retrieve(made.id), lambda: intruder.chat.completions.delete(made.id), lambda: intruder.chat.completions.messages.list(made.id)):
            with pytest.raises(openai.NotFoundError):
                attempt()
        assert [c.id for c in intruder.chat.completions.list()] == []
    off = Settings(home=tmp_path / "off", models=[ModelSpec(name="chat", path=tiny_model_path)], store_responses=False)
    with ServerThread(off, engine_factory=FakeEngineFactory()) as server:
        with pytest.raises(openai.BadRequestError) as refused:
            server.client().chat.completions.create(model="chat", messages=_messages("hi"), max_tokens=2, store=True)
        assert refused.value.body["param"] == "store"
