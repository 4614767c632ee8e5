"""Tool calls without a model: the plan's forced formats, the output readers, the prompt's
fallback for templates that cannot show tools."""

import asyncio
import json

import jsonschema
import pytest
from transformers import AutoTokenizer

from server.api.generation import ChoiceChunk, read_tool_calls
from server.api.tools import Function, HermesReader, ToolPlan, calls_schema
from server.engines.base import Chunk
from server.engines.prompt import chat_prompt_ids

WEATHER = Function("get_weather", "Weather in a city", {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
TIME = Function("get_time", None, {"type": "object", "properties": {}})


def test_a_named_choice_forces_that_functions_arguments():
    plan = ToolPlan((WEATHER, TIME), "get_weather")
    assert json.loads(plan.json_format().schema) == WEATHER.parameters


def test_required_forces_a_non_empty_list_of_valid_calls():
    schema = calls_schema((WEATHER, TIME))
    jsonschema.validate([{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {}}], schema)
    for wrong in ([], [{"name": "get_weather", "arguments": {}}], [{"name": "nope", "arguments": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)


def test_auto_forces_nothing():
    assert ToolPlan((WEATHER,), "auto").json_format() is None


def _read(plan: ToolPlan, pieces: list[str], reason: str = "stop") -> list[ChoiceChunk]:
    async def chunks():
        for i, piece in enumerate(pieces):
            yield ChoiceChunk(0, Chunk(piece, 1, reason if i == len(pieces) - 1 else None))

    async def collect():
        return [item async for item in read_tool_calls(chunks(), plan, 1)]

    return asyncio.run(collect())


def test_hermes_blocks_become_calls_and_the_text_around_them_content():
    pieces = ["Let me check. <tool", '_call>{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}</tool_call>']
    items = _read(ToolPlan((WEATHER,), "auto"), pieces)
    assert "".join(i.chunk.text for i in items) == "Let me check. "
    assert items[0].chunk.text == "Let me check. "  # the tag's start is held, not sent
    (call,) = items[-1].tool_calls
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Oslo"})
    assert items[-1].chunk.finish_reason == "tool_calls" and call.id.startswith("call_")


def test_text_without_calls_passes_through_with_its_finish_reason():
    items = _read(ToolPlan((WEATHER,), "auto"), ["It is ", "< 5 degrees"], reason="length")
    assert "".join(i.chunk.text for i in items) == "It is < 5 degrees"
    assert items[-1].chunk.finish_reason == "length" and items[-1].tool_calls == ()


def test_a_broken_block_stays_text():
    reader = HermesReader()
    assert reader.feed("<tool_call>{not json}</tool_call>") == ""
    assert reader.finish() == ("<tool_call>{not json}</tool_call>", [])


def test_a_required_list_cut_short_is_content_not_calls():
    items = _read(ToolPlan((WEATHER,), "required"), ['[{"name": "get_weather", "argu'], reason="length")
    assert items[-1].tool_calls == () and items[-1].chunk.text == '[{"name": "get_weather", "argu'


def test_a_named_call_carries_the_whole_output_as_arguments():
    items = _read(ToolPlan((WEATHER,), "get_weather"), ['{"city": ', '"Oslo"}'])
    (call,) = items[-1].tool_calls
    assert call.arguments == '{"city": "Oslo"}' and "".join(i.chunk.text for i in items) == ""
    assert items[-1].chunk.finish_reason == "tool_calls"


def test_a_template_without_tools_gets_them_described_and_earlier_calls_as_text(demo_model_path):
    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)  # SmolLM2's template shows neither
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "5 degrees", "tool_call_id": "call_1"},
    ]
    text = tokenizer.decode(chat_prompt_ids(tokenizer, messages, [WEATHER.as_tool()]))
    assert "<tools>" in text and '"name": "get_weather"' in text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in text
    assert "5 degrees" in text


def test_a_template_with_tools_gets_them_as_they_are(demo_model_path):
    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    tokenizer.chat_template = "{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}"
    text = tokenizer.decode(chat_prompt_ids(tokenizer, [{"role": "user", "content": "hi"}], [WEATHER.as_tool()]))
    assert text == "[get_weather]hi"


def test_a_named_call_streams_its_arguments_and_cut_short_keeps_them_as_openai_does():
    items = _read(ToolPlan((WEATHER,), "get_weather"), ['{"city": ', '"Os'], reason="length")
    first, second = (piece for item in items for piece in item.call_pieces)
    assert (first.name, first.arguments, second.name, second.arguments) == ("get_weather", '{"city": ', None, '"Os')
    assert first.id and second.id is None and second.as_openai() == {"index": 0, "function": {"arguments": '"Os'}}
    (call,) = items[-1].tool_calls
    assert (call.id, call.arguments, items[-1].chunk.finish_reason) == (first.id, '{"city": "Os', "length")
