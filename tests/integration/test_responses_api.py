"""POST /v1/responses through the official client's `responses` API, against a real server on
the transformers engine: the same answers as the chat completion each request means, the
stream's events in order, structured output, function calls and their follow-up, and errors
that name the Responses field. (tests/vllm repeats text and streaming on vLLM.)"""

from __future__ import annotations

import json
import shutil
import time

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from server.config.settings import ModelSpec, Settings
from tests.conftest import ServerThread
from tests.fake_engine import FakeBehaviour, FakeEngineFactory
from tests.integration.test_openai_surface import TOOLS

WEATHER = [{"type": "function", **tool["function"]} for tool in TOOLS]


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return tiny_server.client()  # closed with the server: an unclosed pool's socket warned at exit, and failed the run


def streamed(client, **request) -> list:
    return list(client.responses.create(**request, stream=True))


def _without_ids(response) -> dict:
    """A response as the model made it: ids and times are new in each answer (a forced
    call's call_id too)."""
    whole = response.model_dump(exclude={"id", "created_at"})
    whole["output"] = [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in whole["output"]]
    return whole


def assert_a_well_formed_stream(events, final) -> None:
    """What a client relies on: numbered events, created first, one terminal event last whose
    response is the one returned whole, and deltas that add up to each item's text."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[0].response.status == "in_progress"
    assert events[-1].type in ("response.completed", "response.incomplete") and events[-1].response.id == events[0].response.id
    assert _without_ids(events[-1].response) == _without_ids(final)
    for index, item in enumerate(final.output):
        if item.type == "message":
            deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta" and e.output_index == index)
            assert deltas == item.content[0].text
        else:
            deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta" and e.output_index == index)
            assert deltas == item.arguments
    added = [e.output_index for e in events if e.type == "response.output_item.added"]
    done = [e.output_index for e in events if e.type == "response.output_item.done"]
    assert added == done == list(range(len(final.output)))


def test_a_response_is_the_chat_completion_it_means(client):
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}], max_completion_tokens=6, temperature=0
    )
    response = client.responses.create(model="tiny", instructions="Be brief.", input="Hello there", max_output_tokens=6, temperature=0)
    assert response.object == "response" and response.id.startswith("resp_") and response.model == "tiny"
    assert response.output_text == chat.choices[0].message.content
    assert (response.status, response.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    assert (response.usage.input_tokens, response.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert response.usage.total_tokens == chat.usage.total_tokens and response.store is True  # kept, as OpenAI's default is


def test_input_items_are_the_conversation(client):
    items = [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello "}, {"type": "input_text", "text": "there"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hi!", "annotations": []}]},
        {"role": "user", "content": "And again?"},
    ]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "And again?"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=6, temperature=0)
    response = client.responses.create(model="tiny", input=items, max_output_tokens=6, temperature=0)
    assert response.output_text == chat.choices[0].message.content


def test_the_stream_is_the_whole_response_event_by_event(client):
    request = dict(model="tiny", input="Hello there", max_output_tokens=8, temperature=0)
    whole = client.responses.create(**request)
    events = streamed(client, **request)
    assert_a_well_formed_stream(events, whole)
    kinds = [e.type for e in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.incomplete"]


def test_the_quick_tour_answer(smol_server):
    answer = smol_server.client().responses.create(model="smollm2", input="What is the capital of France?", temperature=0)
    assert "Paris" in answer.output_text and answer.status == "completed"


def test_structured_output_and_the_sdk_parse_helper(smol_server):
    class Person(BaseModel):
        name: str
        age: int

    smol = smol_server.client()
    parsed = smol.responses.parse(model="smollm2", input="Alice is 30 years old. Extract the person.", max_output_tokens=80, temperature=0, text_format=Person)
    assert parsed.output_parsed == Person(name="Alice", age=30) and parsed.status == "completed"
    with smol.responses.stream(model="smollm2", input="Alice is 30 years old. Extract the person.", max_output_tokens=80, temperature=0, text_format=Person) as stream:
        deltas = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        final = stream.get_final_response()  # the SDK's helper needs response.completed
    assert final.output_parsed == Person(name="Alice", age=30) and deltas == final.output_text
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}}, "required": ["answer"], "additionalProperties": False}
    text = {"format": {"type": "json_schema", "name": "yes_no", "schema": schema}}
    answer = smol.responses.create(model="smollm2", input="Is the sky blue?", text=text, max_output_tokens=40, temperature=0)
    jsonschema.validate(json.loads(answer.output_text), schema)
    assert answer.text.format.type == "json_schema"


def test_function_calls_stream_and_the_follow_up_answers_them(smol_server):
    smol = smol_server.client()
    request = dict(model="smollm2", input="What is the weather in Paris?", tools=WEATHER, tool_choice="required", max_output_tokens=80, temperature=0)
    whole = smol.responses.create(**request)
    calls = [item for item in whole.output if item.type == "function_call"]
    assert calls and whole.status == "completed"
    for call in calls:
        assert call.call_id.startswith("call_") and call.id.startswith("fc_")
        jsonschema.validate(json.loads(call.arguments), next(t["parameters"] for t in WEATHER if t["name"] == call.name))
    events = streamed(smol, **request)
    assert_a_well_formed_stream(events, whole)
    assert sum(e.type == "response.function_call_arguments.delta" for e in events) > 1  # streamed as generated
    follow_up = [
        {"role": "user", "content": "What is the weather in Paris?"},
        *({"type": "function_call", "call_id": c.call_id, "name": c.name, "arguments": c.arguments} for c in calls),
        *({"type": "function_call_output", "call_id": c.call_id, "output": '{"temperature": 21, "sky": "clear"}'} for c in calls),
    ]
    answer = smol.responses.create(model="smollm2", input=follow_up, tools=WEATHER, max_output_tokens=60, temperature=0)
    assert answer.output[0].type == "message" and answer.output_text
    outputs = [{"type": "function_call_output", "call_id": c.call_id, "output": '{"temperature": 21, "sky": "clear"}'} for c in calls]
    continued = smol.responses.create(model="smollm2", previous_response_id=whole.id, input=outputs, tools=WEATHER, max_output_tokens=60, temperature=0)
    assert continued.output_text == answer.output_text  # the agent loop, the calls kept on the server


def test_a_named_function_is_forced(smol_server):
    named = smol_server.client().responses.create(
        model="smollm2", input="What time is it in Paris?", tools=WEATHER, tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=80, temperature=0
    )
    assert [item.name for item in named.output if item.type == "function_call"] == ["get_weather"]


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"input": []}, "input", ""),
        ({"max_output_tokens": 0}, "max_output_tokens", ""),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "objekt"}}}}, "text.format.schema", "not a valid JSON schema"),
        ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "objekt"}}]}, "tools.0.parameters", "not a valid JSON schema"),
        ({"tool_choice": {"type": "function", "name": "nope"}, "tools": WEATHER}, "tool_choice", "not among the tools"),
        ({"reasoning": {"effort": "high", "summary": "auto"}}, "reasoning.summary", ""),
        ({"include": ["reasoning.encrypted_content"]}, "include", ""),
        ({"prompt": {"id": "pmpt_1"}}, "prompt", "baton does not implement it"),
        ({"input": [{"type": "input_image", "image_url": "http://x"}]}, "input", ""),
        # the part that is wrong, not "should be a valid string" from input's string branch
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input.0.content.0.type", "'input_text' or 'output_text'"),
        ({"input": [{"type": "function_call", "call_id": "c1", "name": "f"}]}, "input.0.arguments", "Missing required parameter"),
        ({"input": [{"type": "function_call_output", "call_id": "c1", "output": "5 degrees"}]}, "input", "answers no call made before it"),
    ],
)
def test_bad_requests_are_400s_naming_the_responses_field(tiny_server, extra, param, words):
    body = {"model": "tiny", "input": "Hello there", "max_output_tokens": 4, **extra}
    refused = httpx.post(f"{tiny_server.url}/v1/responses", json=body, timeout=60)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] is not None and error["param"].startswith(param) and words in error["message"]


def test_the_output_texts_logprobs_are_chats_whole_and_streamed(client):
    """include: message.output_text.logprobs (or top_logprobs): each token of the answer's
    text with its logprob and alternatives, as chat's logprobs give them; the stream's deltas
    carry theirs, which add up to the finished part's."""
    asked = dict(model="tiny", input="Hello there", max_output_tokens=6, temperature=0, top_logprobs=2)
    whole = client.responses.create(**asked, include=["message.output_text.logprobs"])
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello there"}], max_completion_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    part = whole.output[0].content[0]
    assert whole.top_logprobs == 2 and part.logprobs and all(len(token.top_logprobs) == 2 for token in part.logprobs)
    expected = [token.model_dump() for token in chat.choices[0].logprobs.content]
    assert [token.model_dump() for token in part.logprobs] == expected[: len(part.logprobs)]  # a last token without text has none here
    events = streamed(client, **asked)
    deltas = [token for event in events if event.type == "response.output_text.delta" for token in event.logprobs]
    (done,) = [event for event in events if event.type == "response.output_text.done"]
    assert [t.model_dump() for t in deltas] == [t.model_dump() for t in done.logprobs] == [t.model_dump() for t in part.logprobs]
    assert client.responses.create(**{**asked, "top_logprobs": None}).output[0].content[0].logprobs == []  # not asked for


def test_the_defaults_sdks_send_are_accepted(client):
    defaults = dict(include=[], truncation="disabled", background=False, service_tier="auto", reasoning=None, store=False, parallel_tool_calls=True)
    assert client.responses.create(model="tiny", input="Hello there", max_output_tokens=2, **defaults).status == "incomplete"


def test_a_follow_up_continues_a_kept_response_as_if_the_conversation_were_sent(client):
    """previous_response_id: the kept input and output come first, the instructions do not
    (OpenAI's rule); the answer is the one a stateless request with that conversation gets."""
    asked = dict(model="tiny", max_output_tokens=4, temperature=0)
    first = client.responses.create(**asked, instructions="Be brief.", input="My name is Ada.")
    follow_up = client.responses.create(**asked, previous_response_id=first.id, input="What is my name?")
    conversation = [{"role": "user", "content": "My name is Ada."}, *[item.model_dump(exclude_none=True) for item in first.output], {"role": "user", "content": "What is my name?"}]
    stateless = client.responses.create(**asked, input=conversation, store=False)
    assert follow_up.previous_response_id == first.id and stateless.store is False
    assert (follow_up.output_text, follow_up.usage.input_tokens) == (stateless.output_text, stateless.usage.input_tokens)
    third = client.responses.create(**asked, previous_response_id=follow_up.id, input="And again?")
    assert third.usage.input_tokens > follow_up.usage.input_tokens + follow_up.usage.output_tokens  # both turns before it


def test_a_kept_response_is_read_and_deleted_and_a_later_one_lives_on(client):
    first = client.responses.create(model="tiny", input="Hello there", max_output_tokens=3, temperature=0)
    second = client.responses.create(model="tiny", previous_response_id=first.id, input="Go on", max_output_tokens=3, temperature=0)
    assert client.responses.retrieve(first.id).model_dump() == first.model_dump()
    assert client.responses.delete(first.id) is None  # the SDK returns nothing; the server said deleted
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(first.id)
    assert client.responses.create(model="tiny", previous_response_id=second.id, input="More", max_output_tokens=3).previous_response_id == second.id
    unkept = client.responses.create(model="tiny", input="Hello there", max_output_tokens=3, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unkept.id)


def test_the_input_items_of_a_kept_response_come_page_by_page(client, tiny_server):
    first = client.responses.create(model="tiny", input="one", max_output_tokens=2)
    second = client.responses.create(model="tiny", previous_response_id=first.id, input=[{"role": "user", "content": "two"}, {"role": "user", "content": "three"}], max_output_tokens=2)

    def texts(items) -> list[str]:
        return [item.content[0].text for item in items]

    expected = ["one", first.output_text, "two", "three"]
    assert texts(client.responses.input_items.list(second.id, limit=3, order="asc")) == expected  # the SDK follows the pages
    newest_first = client.responses.input_items.list(second.id)
    assert texts(newest_first.data) == expected[::-1] and not newest_first.has_more
    assert all(item.id for item in newest_first.data) and len({item.id for item in newest_first.data}) == 4
    refused = httpx.get(f"{tiny_server.url}/v1/responses/{second.id}/input_items", params={"after": "msg_nosuch"})
    assert (refused.status_code, refused.json()["error"]["param"]) == (400, "after")


def test_a_streamed_response_is_kept_as_its_last_event_says(client):
    events = streamed(client, model="tiny", input="Hello there", max_output_tokens=5, temperature=0)
    assert client.responses.retrieve(events[-1].response.id).model_dump() == events[-1].response.model_dump()


def test_an_unknown_previous_response_is_a_404_naming_it(tiny_server):
    body = {"model": "tiny", "input": "Hello there", "max_output_tokens": 2, "previous_response_id": "resp_nosuch"}
    refused = httpx.post(f"{tiny_server.url}/v1/responses", json=body, timeout=60)
    assert refused.status_code == 404 and refused.json()["error"]["param"] == "previous_response_id", refused.text
    assert refused.json()["error"]["code"] == "response_not_found"


def _polled(client, response_id: str, seconds: float = 30.0):
    deadline = time.monotonic() + seconds
    while (response := client.responses.retrieve(response_id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline, "the background response did not end"
        time.sleep(0.05)
    return response


def test_a_background_response_is_answered_at_once_and_polled_to_the_same_answer(client):
    asked = dict(model="tiny", input="Hello there", max_output_tokens=8, temperature=0)
    started = client.responses.create(**asked, background=True)
    assert (started.status, started.background, started.output) == ("in_progress", True, [])
    ended = _polled(client, started.id)
    assert _without_ids(ended) == {**_without_ids(client.responses.create(**asked)), "background": True}
    assert client.responses.cancel(started.id).status == ended.status  # over: left as it ended


def test_a_background_response_must_be_kept(tiny_server):
    body = {"model": "tiny", "input": "Hello there", "max_output_tokens": 2, "background": True, "store": False}
    refused = httpx.post(f"{tiny_server.url}/v1/responses", json=body, timeout=60)
    assert (refused.status_code, refused.json()["error"]["param"]) == (400, "store"), refused.text


def test_a_background_stream_is_followed_again_from_where_its_client_left(client):
    """The client reads four events and goes; the run goes on, and a GET with the last
    sequence number it saw gives it the rest: together, the whole stream of the answer."""
    asked = dict(model="tiny", input="Hello there", max_output_tokens=12, temperature=0)
    stream = client.responses.create(**asked, background=True, stream=True)
    seen = [event for event, _ in zip(stream, range(4))]
    stream.close()
    rest = list(client.responses.retrieve(seen[0].response.id, stream=True, starting_after=seen[-1].sequence_number))
    ended = _polled(client, seen[0].response.id)
    assert_a_well_formed_stream(seen + rest, ended)
    assert _without_ids(ended) == {**_without_ids(client.responses.create(**asked)), "background": True}
    again = list(client.responses.retrieve(ended.id, stream=True))
    assert [e.model_dump() for e in again] == [e.model_dump() for e in seen + rest]


@pytest.mark.parametrize("background", [False, True])
def test_only_a_streamed_background_response_is_streamed_again(client, tiny_server, background):
    kept = client.responses.create(model="tiny", input="Hello there", max_output_tokens=2, background=background)
    _polled(client, kept.id)
    refused = httpx.get(f"{tiny_server.url}/v1/responses/{kept.id}", params={"stream": "true"}, timeout=60)
    assert (refused.status_code, refused.json()["error"]["param"]) == (400, "stream"), refused.text
    assert ("not kept" in refused.text) is background


def test_a_background_response_is_cancelled_and_one_that_fails_says_why(tiny_model_path, tmp_path):
    """Cancelled: the generation stops in the engine and the lease goes back. A version whose
    generations fail: the Response is `failed` with the error, not lost."""
    faulty = tmp_path / "faulty"
    shutil.copytree(tiny_model_path, faulty)
    factory = FakeEngineFactory({faulty.name: FakeBehaviour(fails_requests=True)}, default=FakeBehaviour(token_seconds=0.05))
    models = [ModelSpec(name="chat", path=tiny_model_path), ModelSpec(name="faulty", path=faulty)]
    with ServerThread(Settings(home=tmp_path / "home", models=models), engine_factory=factory) as server:
        client = server.client()
        long = client.responses.create(model="chat", input="hi", max_output_tokens=2000, background=True)
        time.sleep(0.3)
        cancelled = client.responses.cancel(long.id)
        assert cancelled.status == "cancelled" and client.responses.retrieve(long.id).status == "cancelled"
        assert httpx.get(f"{server.url}/admin/deployments/chat").json()["in_flight"] == 0
        assert not factory.built[0].health().num_running
        streamed = client.responses.create(model="chat", input="hi", max_output_tokens=2000, background=True, stream=True)
        first = next(iter(streamed))
        assert client.responses.cancel(first.response.id).status == "cancelled"
        assert all(event.type != "response.completed" for event in streamed)  # the stream ends with its run
        assert not factory.built[0].health().num_running
        failed = _polled(client, client.responses.create(model="faulty", input="hi", max_output_tokens=5, background=True).id)
        assert failed.status == "failed" and "injected fault" in failed.error.message
        with pytest.raises(openai.BadRequestError, match="Only a background response"):
            client.responses.cancel(client.responses.create(model="chat", input="hi", max_output_tokens=2).id)


def test_truncation_auto_drops_the_oldest_turns_until_the_conversation_fits(client, tiny_server):
    max_model_len = httpx.get(f"{tiny_server.url}/v1/models").json()["data"][0]["max_model_len"]
    turn = "Tell me about the weather in a long sentence, with many words in it. " * 8
    history = [item for _ in range(max_model_len // 100 + 2) for item in ({"role": "user", "content": turn}, {"role": "assistant", "content": turn})]
    asked = dict(model="tiny", instructions="Be brief.", input=[*history, {"role": "user", "content": "And now?"}], max_output_tokens=4)
    with pytest.raises(openai.BadRequestError) as too_long:
        client.responses.create(**asked)
    assert too_long.value.body["param"] == "input" and too_long.value.body["code"] == "context_length_exceeded"
    fitted = client.responses.create(**asked, truncation="auto")
    assert fitted.truncation == "auto" and max_model_len // 2 < fitted.usage.input_tokens <= max_model_len - 4  # the newest turns that fit, not just the last


def test_an_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="Hello there")
