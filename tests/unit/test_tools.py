"""Tool calls without a model: the plan's forced formats, the output readers, the prompt's
fallback for templates that cannot show tools."""

import asyncio
import json

import jsonschema
import pytest
from transformers import AutoTokenizer

from server.api.generation import ChoiceChunk, read_tool_calls
from models.errors import InvalidRequestError
from server.api.tool_formats import CALL_FORMATS, format_taught_by
from server.api.tools import FormatReader, Function, ToolPlan, calls_schema, check_tool_parser
from server.engines.base import Chunk
from server.engines.prompt import chat_prompt_ids

WEATHER = Function("get_weather", "Weather in a city", {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
TIME = Function("get_time", None, {"type": "object", "properties": {}})


def test_a_named_choice_forces_that_functions_arguments():
    plan = ToolPlan((WEATHER, TIME), "get_weather")
    assert json.loads(plan.output_format().spec) == WEATHER.parameters


def test_required_forces_a_non_empty_list_of_valid_calls():
    schema = calls_schema((WEATHER, TIME))
    jsonschema.validate([{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {}}], schema)
    for wrong in ([], [{"name": "get_weather", "arguments": {}}], [{"name": "nope", "arguments": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)


def test_auto_forces_nothing():
    assert ToolPlan((WEATHER,), "auto").output_format() is None


def _read(plan: ToolPlan, pieces: list[str], reason: str = "stop", tool_parser: str = "hermes") -> list[ChoiceChunk]:
    async def chunks():
        for i, piece in enumerate(pieces):
            yield ChoiceChunk(0, Chunk(piece, 1, reason if i == len(pieces) - 1 else None))

    async def collect():
        return [item async for item in read_tool_calls(chunks(), lambda: plan.reader(tool_parser), 1)]

    return asyncio.run(collect())


def test_hermes_blocks_become_calls_and_the_text_around_them_content():
    pieces = ["Let me check. <tool", '_call>{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}</tool_call>']
    items = _read(ToolPlan((WEATHER,), "auto"), pieces)
    assert "".join(i.chunk.text for i in items) == "Let me check. "
    assert items[0].chunk.text == "Let me check. "  # the tag's start is held, not sent
    (call,) = items[-1].tool_calls
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Oslo"})
    assert items[-1].chunk.finish_reason == "tool_calls" and call.id.startswith("call_")


@pytest.mark.parametrize(
    ("tool_parser", "output"),
    [
        ("hermes", 'On it. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo, \\"NO\\""}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'),
        ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Oslo, \\"NO\\""}}; {"name": "get_time", "parameters": {}}'),
    ],
)
def test_auto_calls_stream_piece_by_piece_where_their_format_is_json(tool_parser, output):
    items = _read(ToolPlan((WEATHER, TIME), "auto"), [output[i : i + 4] for i in range(0, len(output), 4)], tool_parser=tool_parser)
    pieces = [p for item in items for p in item.call_pieces]
    firsts = [p for p in pieces if p.id]
    assert [(p.index, p.name) for p in firsts] == [(0, "get_weather"), (1, "get_time")]
    assert sum(1 for p in pieces if p.index == 0) > 3  # the arguments came in several pieces, before the end
    assert [p for p in items[-1].call_pieces if p.id] == []  # announced while streaming, not again at the end
    for index, call in enumerate(items[-1].tool_calls):
        assert call.id == firsts[index].id and "".join(p.arguments for p in pieces if p.index == index) == call.arguments
    assert _calls(items) == [("get_weather", {"city": 'Oslo, "NO"'}), ("get_time", {})]
    assert "".join(i.chunk.text for i in items) == ("On it. " if tool_parser == "hermes" else "")
    assert items[-1].chunk.finish_reason == "tool_calls"


def test_an_auto_call_cut_short_keeps_what_streamed_as_a_forced_call_does():
    items = _read(ToolPlan((WEATHER,), "auto"), ['<tool_call>{"name": "get_weather", "arguments": {"ci'], reason="length")
    (call,) = items[-1].tool_calls
    assert (call.name, call.arguments) == ("get_weather", '{"ci')
    assert items[-1].chunk.finish_reason == "length" and "".join(i.chunk.text for i in items) == ""


def test_text_without_calls_passes_through_with_its_finish_reason():
    items = _read(ToolPlan((WEATHER,), "auto"), ["It is ", "< 5 degrees"], reason="length")
    assert "".join(i.chunk.text for i in items) == "It is < 5 degrees"
    assert items[-1].chunk.finish_reason == "length" and items[-1].tool_calls == ()


def test_a_broken_block_stays_text():
    reader = FormatReader(CALL_FORMATS["hermes"])
    assert reader.feed("<tool_call>{not json}</tool_call>") == ""
    assert reader.finish() == ("<tool_call>{not json}</tool_call>", [])


def test_required_calls_stream_piece_by_piece_as_they_are_written():
    output = '[{"name": "get_weather", "arguments": {"city": "Oslo, \\"NO\\"", "days": [1, {"x": "}"}]}}, {"arguments": {}, "name": "get_time"}]'
    items = _read(ToolPlan((WEATHER, TIME), "required"), [output[i : i + 5] for i in range(0, len(output), 5)])
    pieces = [p for item in items for p in item.call_pieces]
    firsts = [p for p in pieces if p.id]
    assert [(p.index, p.name) for p in firsts] == [(0, "get_weather"), (1, "get_time")]
    for index, call in enumerate(items[-1].tool_calls):
        assert "".join(p.arguments for p in pieces if p.index == index) == call.arguments
        assert call.id == firsts[index].id
    weather, time_ = items[-1].tool_calls
    assert json.loads(weather.arguments) == {"city": 'Oslo, "NO"', "days": [1, {"x": "}"}]} and json.loads(time_.arguments) == {}
    assert sum(1 for p in pieces if p.index == 0) > 3  # the arguments came in several pieces
    assert items[-1].chunk.finish_reason == "tool_calls" and "".join(i.chunk.text for i in items) == ""


def test_a_required_list_cut_short_keeps_the_calls_begun():
    items = _read(ToolPlan((WEATHER,), "required"), ['[{"name": "get_weather", "arguments": {"ci'], reason="length")
    (call,) = items[-1].tool_calls
    assert (call.name, call.arguments) == ("get_weather", '{"ci')
    assert items[-1].chunk.finish_reason == "length" and items[-1].chunk.text == ""


def test_a_required_list_cut_before_a_name_is_content():
    items = _read(ToolPlan((WEATHER,), "required"), ['[{"na'], reason="length")
    assert items[-1].tool_calls == () and items[-1].chunk.text == '[{"na'


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


def _calls(items: list[ChoiceChunk]) -> list[tuple[str, dict]]:
    return [(call.name, json.loads(call.arguments)) for call in items[-1].tool_calls]


@pytest.mark.parametrize(
    ("tool_parser", "pieces", "content"),
    [
        ("hermes", ["Sure. <tool_call>", '{"name": "get_weather", "arguments": {"city": "Oslo"}}', "</tool_call>"], "Sure. "),
        ("mistral", ["Sure. [TOOL", '_CALLS][{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}]'], "Sure. "),
        ("mistral", ["[TOOL_CALLS]get_weather[ARGS]", '{"city": "Oslo"}'], ""),
        ("llama3_json", ["  ", '{"name": "get_weather", "parameters": {"city": "Oslo"}}'], ""),
        ("llama3_json", ["<|python_tag|>", '{"name": "get_weather", "parameters": {"city": "Oslo"}}'], ""),
        ("pythonic", ['[get_weather(city="Oslo")]'], ""),
    ],
)
def test_each_call_format_is_read(tool_parser, pieces, content):
    items = _read(ToolPlan((WEATHER,), "auto"), pieces, tool_parser=tool_parser)
    assert _calls(items) == [("get_weather", {"city": "Oslo"})]
    assert "".join(i.chunk.text for i in items) == content
    assert items[-1].chunk.finish_reason == "tool_calls"


def test_formats_read_several_calls():
    both = '[get_weather(city="Oslo"), get_time()]'
    assert _calls(_read(ToolPlan((WEATHER, TIME), "auto"), [both], tool_parser="pythonic")) == [("get_weather", {"city": "Oslo"}), ("get_time", {})]
    two = '{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "get_time", "parameters": {}}'
    assert [name for name, _ in _calls(_read(ToolPlan((WEATHER, TIME), "auto"), [two], tool_parser="llama3_json"))] == ["get_weather", "get_time"]


@pytest.mark.parametrize(
    ("tool_parser", "text"),
    [
        ("llama3_json", "Oslo is in Norway; {it} is cold."),  # a brace later on is text
        ("llama3_json", "{not a call}"),
        ("pythonic", "[1, 2] are numbers"),
        ("pythonic", "[__import__('os').system('true')]"),  # read, never run: not a call
        ("mistral", "[TOOL_CALLS] no json here"),
    ],
)
def test_text_that_is_not_calls_stays_content_whole(tool_parser, text):
    items = _read(ToolPlan((WEATHER,), "auto"), [text[:7], text[7:]], tool_parser=tool_parser)
    assert "".join(i.chunk.text for i in items) == text
    assert items[-1].tool_calls == () and items[-1].chunk.finish_reason == "stop"


def test_plain_answers_stream_at_once_once_they_cannot_open_with_a_call():
    reader = FormatReader(CALL_FORMATS["llama3_json"])
    assert reader.feed("  ") == ""  # could still open with a call
    assert reader.feed("Hello") == "  Hello"


def test_an_unknown_tool_parser_is_refused_naming_the_known_ones():
    check_tool_parser("mistral")
    check_tool_parser(None)
    with pytest.raises(InvalidRequestError, match="hermes.*pythonic") as error:
        check_tool_parser("no-such-format")
    assert error.value.param == "engine_options.tool_parser"


@pytest.mark.parametrize(
    ("template", "taught"),
    [
        ("{%- if tools %}<tool_call>{{ tool }}</tool_call>{% endif %}", "hermes"),  # Qwen
        ("{%- if message.tool_calls %}[TOOL_CALLS]{{ calls }}{% endif %}", "mistral"),
        ('{{- "<|python_tag|>" + tool_call.function.name }}', "llama3_json"),  # Llama 3.1
        ("<|python_start|>{{ calls }}<|python_end|>", "pythonic"),  # Llama 4
        ("{{ messages }}", "hermes"),  # teaches nothing: baton describes tools in Hermes' format
        (None, "hermes"),
    ],
)
def test_a_chat_template_says_which_call_format_it_teaches(template, taught):
    assert format_taught_by(template) == taught
