from __future__ import annotations

import pytest

from server.api.reasoning import ReasoningSplitter, prompt_opens_reasoning, reads_reasoning

QWEN3 = "<think>\nThe user greets me.\n</think>\n\nHello! How can I help?"
R1 = "The user greets me.\n</think>\n\nHello! How can I help?"  # its prompt opened the tag


def _split(text: str, starts_in_reasoning: bool, size: int) -> tuple[str, str]:
    """Fed `size` characters at a time, as a stream of any chunking would arrive."""
    splitter, reasoning, content = ReasoningSplitter(starts_in_reasoning), "", ""
    for start in range(0, len(text), size):
        more_reasoning, more_content = splitter.feed(text[start : start + size])
        reasoning, content = reasoning + more_reasoning, content + more_content
    rest_reasoning, rest_content = splitter.finish()
    return reasoning + rest_reasoning, content + rest_content


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_thinking_and_answer_come_apart_however_the_text_is_chunked(size):
    assert _split(QWEN3, False, size) == ("\nThe user greets me.\n", "Hello! How can I help?")
    assert _split(R1, True, size) == ("The user greets me.\n", "Hello! How can I help?")
    assert _split("  " + QWEN3, False, size) == ("\nThe user greets me.\n", "Hello! How can I help?")


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_text_without_tags_is_content_and_a_near_tag_is_sent_as_written(size):
    assert _split("Hello there.", False, size) == ("", "Hello there.")
    assert _split("<thinking> is not a tag", False, size) == ("", "<thinking> is not a tag")
    assert _split("<thi", False, size) == ("", "<thi")  # the output ended mid-way: what it was
    assert _split("a <think> later is content", False, size) == ("", "a <think> later is content")


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_output_cut_inside_reasoning_is_all_reasoning(size):
    assert _split("<think>still thinking </thi", False, size) == ("still thinking </thi", "")
    assert _split("still thinking", True, size) == ("still thinking", "")


def test_no_piece_of_a_tag_is_ever_sent():
    splitter = ReasoningSplitter(False)
    assert splitter.feed("<thi") == ("", "")
    assert splitter.feed("nk>plan</th") == ("plan", "")
    assert splitter.feed("ink>\n\n") == ("", "")
    assert splitter.feed("Answer") == ("", "Answer")
    assert splitter.finish() == ("", "")


def test_a_prompt_that_leaves_think_open_starts_the_output_in_reasoning():
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # Qwen3, thinking off
    assert not prompt_opens_reasoning("<|im_start|>assistant\n")


def test_a_version_reads_reasoning_where_its_template_teaches_think_or_its_option_says():
    template = "{% if enable_thinking %}<think>{% endif %}"
    assert reads_reasoning(None, template) and not reads_reasoning(None, "{{ messages }}") and not reads_reasoning(None, None)
    assert not reads_reasoning("none", template) and reads_reasoning("think", "{{ messages }}")


def test_calls_after_thinking_are_read_from_the_content_and_the_thinking_kept():
    """The order the API runs them in: reasoning apart first, then tool calls from the content."""
    import asyncio
    import json

    from server.api.generation import ChoiceChunk, read_tool_calls
    from server.api.reasoning import read_reasoning
    from server.api.tools import Function, ToolPlan
    from server.engines.base import Chunk

    weather = Function("get_weather", None, {"type": "object", "properties": {"city": {"type": "string"}}})
    output = '<think>\nThe user wants Oslo\'s weather. <tool_call> is how I call.\n</think>\n\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    pieces = [output[i : i + 5] for i in range(0, len(output), 5)]

    async def chunks():
        for i, piece in enumerate(pieces):
            yield ChoiceChunk(0, Chunk(piece, 1, "stop" if i == len(pieces) - 1 else None))

    async def collect():
        split = read_reasoning(chunks(), [ReasoningSplitter(False)])
        return [item async for item in read_tool_calls(split, lambda: ToolPlan((weather,), "auto").reader("hermes"), 1)]

    items = asyncio.run(collect())
    assert "".join(i.reasoning for i in items) == "\nThe user wants Oslo's weather. <tool_call> is how I call.\n"
    assert "".join(i.chunk.text for i in items) == ""
    (call,) = items[-1].tool_calls
    assert (call.name, json.loads(call.arguments), items[-1].chunk.finish_reason) == ("get_weather", {"city": "Oslo"}, "tool_calls")
