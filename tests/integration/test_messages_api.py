"""POST /v1/messages (Anthropic's Messages API, as vLLM's server serves it) through the
official anthropic client, against a real server on the transformers engine: the same answers
as the chat completion each request means, the stream's events in order, stop sequences,
tool use and its follow-up, count_tokens, and Anthropic-shaped errors that name the Messages
field. (test_reasoning_and_templates.py checks thinking blocks.)"""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import pytest

from server.api.messages import MessagesRequest
from tests.integration.test_openai_surface import TOOLS

WEATHER = [{"name": t["function"]["name"], "description": t["function"].get("description"), "input_schema": t["function"]["parameters"]} for t in TOOLS]
HELLO = [{"role": "user", "content": "Hello there"}]
GREEDY = {"temperature": 0}  # vLLM's server takes Anthropic's sampling fields; the 2.x SDK no longer sends them itself


@pytest.fixture(scope="module")
def client(tiny_server) -> anthropic.Anthropic:
    return tiny_server.anthropic_client()


def test_a_message_is_the_chat_completion_it_means(tiny_server, client):
    chat = tiny_server.client().chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "Be brief."}, *HELLO], max_completion_tokens=6, temperature=0
    )
    message = client.messages.create(model="tiny", system="Be brief.", messages=HELLO, max_tokens=6, extra_body=GREEDY)
    assert message.id.startswith("msg_") and (message.type, message.role, message.model) == ("message", "assistant", "tiny")
    assert [block.type for block in message.content] == ["text"] and message.content[0].text == chat.choices[0].message.content
    assert (message.stop_reason, message.stop_sequence) == ("max_tokens", None)
    assert (_all_input_tokens(message.usage), message.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)


def test_content_blocks_and_system_blocks_are_the_conversation(tiny_server, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "And again?"}]
    chat = tiny_server.client().chat.completions.create(model="tiny", messages=messages, max_completion_tokens=6, temperature=0)
    blocks = [
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there", "cache_control": {"type": "ephemeral"}}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hi!"}]},
        {"role": "user", "content": "And again?"},
    ]
    system = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    message = client.messages.create(model="tiny", system=system, messages=blocks, max_tokens=6, extra_body=GREEDY)
    assert message.content[0].text == chat.choices[0].message.content


def test_a_text_document_is_shown_to_the_model_as_its_title_context_and_text(tiny_server, client):
    chat = tiny_server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Sea notes\n\nFrom a logbook\n\nThe sea is deep.\nIt is cold.\n\nSum it up."}], max_completion_tokens=6, temperature=0
    )
    plain = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "The sea is deep.\nIt is cold."}, "title": "Sea notes", "context": "From a logbook"}
    blocks = {**plain, "source": {"type": "content", "content": [{"type": "text", "text": "The sea is deep."}, {"type": "text", "text": "It is cold."}]}, "citations": {"enabled": True}}
    for document in (plain, blocks):
        messages = [{"role": "user", "content": [document, {"type": "text", "text": "Sum it up."}]}]
        message = client.messages.create(model="tiny", messages=messages, max_tokens=6, extra_body=GREEDY)
        assert message.content[0].text == chat.choices[0].message.content
        assert client.messages.count_tokens(model="tiny", messages=messages).input_tokens == chat.usage.prompt_tokens


def test_the_stream_adds_up_to_the_message(client):
    request = dict(model="tiny", messages=HELLO, max_tokens=8, extra_body=GREEDY)
    whole = client.messages.create(**request)
    with client.messages.stream(**request) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [event.type for event in events]
    assert kinds[:3] == ["message_start", "content_block_start", "content_block_delta"] and kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert "".join(event.delta.text for event in events if event.type == "content_block_delta") == whole.content[0].text
    assert final.model_dump(exclude={"id", "usage"}) == whole.model_dump(exclude={"id", "usage"})
    assert (_all_input_tokens(final.usage), final.usage.output_tokens) == (_all_input_tokens(whole.usage), whole.usage.output_tokens)  # the later one reads the prefix cache
    assert events[0].message.usage.input_tokens == _all_input_tokens(whole.usage)  # the start comes before the prefix cache is read


def test_the_stream_pings_after_its_start_as_anthropics_api_does(tiny_server):
    """The SDK skips pings; a client of the raw events sees Anthropic's order."""
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{tiny_server.url}/v1/messages", json=body, timeout=60) as response:
        kinds = [line.removeprefix("event: ") for line in response.iter_lines() if line.startswith("event: ")]
    assert kinds[:3] == ["message_start", "ping", "content_block_start"] and kinds[-1] == "message_stop"


def test_the_quick_tour_answer(smol_server):
    message = smol_server.anthropic_client().messages.create(
        model="smollm2", max_tokens=32, extra_body=GREEDY, messages=[{"role": "user", "content": "What is the capital of France?"}]
    )
    assert message.content[0].text == "The capital of France is Paris." and message.stop_reason == "end_turn"


def test_a_stop_sequence_ends_the_answer_and_is_named(client):
    free = client.messages.create(model="tiny", messages=HELLO, max_tokens=12, extra_body=GREEDY).content[0].text
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    assert stop.strip(), free  # a random model's text: some characters to stop at
    cut = client.messages.create(model="tiny", messages=HELLO, max_tokens=12, extra_body=GREEDY, stop_sequences=[stop, "never written"])
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)
    assert cut.content[0].text == free[: free.index(stop)]
    with client.messages.stream(model="tiny", messages=HELLO, max_tokens=12, extra_body=GREEDY, stop_sequences=[stop]) as stream:
        streamed = stream.get_final_message()
    assert (streamed.stop_reason, streamed.stop_sequence, streamed.content[0].text) == ("stop_sequence", stop, cut.content[0].text)


def test_tool_use_whole_and_streamed_and_the_follow_up_answers_it(smol_server):
    client = smol_server.anthropic_client()
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    request = dict(model="smollm2", messages=question, tools=WEATHER, tool_choice={"type": "any"}, max_tokens=80, extra_body=GREEDY)
    whole = client.messages.create(**request)
    uses = [block for block in whole.content if block.type == "tool_use"]
    assert uses and whole.stop_reason == "tool_use"
    for use in uses:
        jsonschema.validate(use.input, next(t["input_schema"] for t in WEATHER if t["name"] == use.name))
    with client.messages.stream(**request) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == [(u.name, u.input) for u in uses]
    for index, block in enumerate(final.content):  # each call's input, streamed as generated, adds up to it
        pieces = [e.delta.partial_json for e in events if e.type == "content_block_delta" and e.index == index and e.delta.type == "input_json_delta"]
        assert block.type != "tool_use" or (len(pieces) > 1 and json.loads("".join(pieces)) == block.input)
    follow_up = [
        *question,
        {"role": "assistant", "content": [u.model_dump(include={"type", "id", "name", "input"}) for u in uses]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": u.id, "content": '{"temperature": 21, "sky": "clear"}'} for u in uses]},
    ]
    answer = client.messages.create(model="smollm2", messages=follow_up, tools=WEATHER, max_tokens=60, extra_body=GREEDY)
    assert answer.content[0].type == "text" and answer.content[0].text and answer.stop_reason == "end_turn"


def test_a_named_tool_is_forced(smol_server):
    client = smol_server.anthropic_client()
    named = client.messages.create(
        model="smollm2", messages=[{"role": "user", "content": "What time is it in Paris?"}], tools=WEATHER, tool_choice={"type": "tool", "name": "get_weather"}, max_tokens=80, extra_body=GREEDY
    )
    assert [block.name for block in named.content if block.type == "tool_use"] == ["get_weather"] and named.stop_reason == "tool_use"


def test_count_tokens_is_the_input_tokens_of_the_same_message(client):
    request = dict(model="tiny", system="Be brief.", messages=HELLO)
    counted = client.messages.count_tokens(**request)
    assert counted.input_tokens == _all_input_tokens(client.messages.create(**request, max_tokens=2).usage)
    with_tools = client.messages.count_tokens(**request, tools=WEATHER)
    assert with_tools.input_tokens > counted.input_tokens  # the tools are shown to the model


@pytest.mark.parametrize(
    ("extra", "status", "kind", "words"),
    [
        ({"max_tokens": None}, 400, "invalid_request_error", "max_tokens"),
        ({"max_tokens": 0}, 400, "invalid_request_error", "max_tokens"),
        ({"messages": []}, 400, "invalid_request_error", "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x"}}]}]}, 400, "invalid_request_error", "messages.0.content.0"),
        ({"messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}}]}]}, 400, "invalid_request_error", "messages.0.content.0.source"),
        ({"messages": [{"role": "user", "content": [{"type": "document", "source": {"type": "url", "url": "file:///etc/passwd"}}]}]}, 400, "invalid_request_error", "messages.0.content.0.source"),
        ({"tools": WEATHER, "tool_choice": {"type": "tool", "name": "nope"}}, 400, "invalid_request_error", "not among the tools"),
        ({"stop_sequences": ["x" * 1025]}, 400, "invalid_request_error", "stop_sequences"),
        ({"temperature": 3}, 400, "invalid_request_error", "temperature"),
        ({"model": "nope"}, 404, "not_found_error", "nope"),
        ({"max_tokens": 10**6}, 400, "invalid_request_error", "maximum context length"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1000}}, 400, "invalid_request_error", "thinking.budget_tokens"),
    ],
)
def test_bad_requests_are_anthropic_shaped_errors_naming_the_messages_field(tiny_server, extra, status, kind, words):
    body = {key: value for key, value in ({"model": "tiny", "messages": HELLO, "max_tokens": 4} | extra).items() if value is not None}
    refused = httpx.post(f"{tiny_server.url}/v1/messages", json=body)
    assert refused.status_code == status, refused.text
    assert refused.json()["type"] == "error" and refused.json()["error"]["type"] == kind, refused.text
    assert words in refused.json()["error"]["message"], refused.text


def test_the_sdk_raises_its_own_errors(client):
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="nope", messages=HELLO, max_tokens=4)
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        client.messages.create(model="tiny", messages=HELLO, max_tokens=0)


def test_tool_blocks_become_the_chat_conversation_they_mean():
    request = MessagesRequest.model_validate(
        {
            "model": "m",
            "max_tokens": 4,
            "system": "Be brief.",
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "Ask the tool.", "signature": ""}, {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "21 C"}]}, {"type": "text", "text": "Thanks"}]},
            ],
            "tools": WEATHER,
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
            "thinking": {"type": "disabled"},
            "metadata": {"user_id": "u1"},
        }
    )
    chat = request.as_chat()
    assert [m.role for m in chat.messages] == ["system", "user", "assistant", "tool", "user"]
    assistant = chat.messages[2]
    assert assistant.reasoning == "Ask the tool." and assistant.tool_calls[0].function.arguments == '{"city": "Paris"}'
    tool = chat.messages[3].as_template_input()
    assert (tool["tool_call_id"], tool["content"]) == ("t1", "21 C")
    assert (chat.tool_choice, chat.parallel_tool_calls, chat.reasoning_effort, chat.user) == ("auto", False, "none", "u1")


@pytest.mark.parametrize(("thinking", "budget"), [({"type": "enabled", "budget_tokens": 2048}, 2048), ({"type": "adaptive"}, None), ({"type": "disabled"}, None), (None, None)])
def test_an_enabled_thinkings_budget_is_chats_thinking_token_budget(thinking, budget):
    """As vLLM's server reads it; test_reasoning_and_templates.py shows the budget held."""
    body = {"model": "m", "max_tokens": 4, "messages": HELLO} | ({"thinking": thinking} if thinking else {})
    chat = MessagesRequest.model_validate(body).as_chat()
    assert chat.thinking_budget == budget and chat.thinking_budget_is_target  # an engine that holds none serves without it


def test_an_oversized_body_is_refused_in_anthropics_shape(tiny_server):
    body = {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "x" * (tiny_server.settings.max_body_bytes + 1)}]}
    refused = httpx.post(f"{tiny_server.url}/v1/messages", json=body)
    assert refused.status_code == 413 and refused.json()["error"]["type"] == "request_too_large", refused.text


def _all_input_tokens(usage) -> int:
    """Anthropic's `input_tokens` leave out those the prefix cache held (`cache_read_input_tokens`)."""
    return usage.input_tokens + (usage.cache_read_input_tokens or 0)
