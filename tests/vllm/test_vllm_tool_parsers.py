"""`tool_parser` naming one of vLLM's parsers: the answer is read by vLLM's own code, with
the version's tokenizer. No engine starts here; `make test` requires vLLM for this tier."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from server.api.tools import Function, ToolPlan, check_tool_parser

WEATHER = Function("get_weather", None, {"type": "object", "properties": {"city": {"type": "string"}}})


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


def test_a_vllm_parser_reads_its_format_at_the_end(tokenizer):
    check_tool_parser("granite")  # vLLM's, not one baton reads itself
    reader = ToolPlan((WEATHER,), "auto").reader("granite", tokenizer)
    assert reader.feed("Let me look. <|tool_call|>") == ""  # held: vLLM's parsers read whole answers
    assert reader.feed('[{"name": "get_weather", "arguments": {"city": "Oslo"}}]') == ""
    content, (call,) = reader.finish()
    assert content == "Let me look."
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Oslo"})
    assert call.id.startswith("call_")


def test_a_vllm_parser_that_cannot_run_here_returns_the_answer_as_content(tokenizer, caplog):
    """vLLM's own llama3_json parser needs Llama's <|python_tag|> token, which SmolLM2's
    tokenizer lacks: building it fails, and the answer still comes back, as content."""
    from server.api.vllm_tool_parsers import VLLMReader

    reader = VLLMReader("llama3_json", tokenizer, [WEATHER.as_tool()])
    answer = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    assert reader.feed(answer) == ""
    assert reader.finish() == (answer, [])
    assert "cannot read this version's answers" in caplog.text


def test_a_vllm_parser_that_finds_no_call_returns_the_text(tokenizer):
    reader = ToolPlan((WEATHER,), "auto").reader("granite", tokenizer)
    reader.feed("Just words, ")
    reader.feed("no call.")
    assert reader.finish() == ("Just words, no call.", [])
