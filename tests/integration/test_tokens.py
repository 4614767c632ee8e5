"""`POST /tokenize` and `/detokenize` through a real server: the counts generation reports,
with the tokenizer and chat template of the version that serves the model."""

from __future__ import annotations

import json

import httpx
import pytest

HI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def _post(server, path: str, expect: int = 200, **body) -> httpx.Response:
    """`body` as ASCII JSON, which can carry a lone surrogate escape (`\\ud800`)."""
    response = httpx.post(f"{server.url}{path}", content=json.dumps(body), headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == expect, response.text
    return response


def test_tokenize_counts_what_a_completion_reads_and_detokenize_gives_the_text_back(tiny_server):
    answer = _post(tiny_server, "/tokenize", model="tiny", prompt="Hello there, general Kenobi").json()
    reply = tiny_server.client().completions.create(model="tiny", prompt="Hello there, general Kenobi", max_tokens=1)
    assert answer["count"] == len(answer["tokens"]) == reply.usage.prompt_tokens
    assert answer["model"] == "tiny" and answer["max_model_len"] > answer["count"]
    assert _post(tiny_server, "/detokenize", model="tiny", tokens=answer["tokens"]).json() == {"model": "tiny", "prompt": "Hello there, general Kenobi"}


def test_tokenize_counts_what_a_chat_completion_reads_tools_included(tiny_server):
    client = tiny_server.client()
    plain = _post(tiny_server, "/tokenize", model="tiny", messages=HI).json()
    with_tools = _post(tiny_server, "/tokenize", model="tiny", messages=HI, tools=WEATHER).json()
    assert plain["count"] == client.chat.completions.create(model="tiny", messages=HI, max_tokens=1).usage.prompt_tokens
    assert with_tools["count"] == client.chat.completions.create(model="tiny", messages=HI, tools=WEATHER, max_tokens=1).usage.prompt_tokens
    assert with_tools["count"] > plain["count"]  # the tools are shown to the model


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"model": "tiny"}, 400, None),  # neither prompt nor messages
        ("/tokenize", {"model": "tiny", "prompt": "hi", "messages": HI}, 400, None),
        ("/tokenize", {"model": "tiny", "prompt": "hi", "tools": WEATHER}, 400, "tools"),  # tools are shown with messages only
        ("/tokenize", {"model": "tiny", "prompt": "\ud800"}, 400, "prompt"),
        ("/tokenize", {"model": "tiny", "prompt": "hi", "add_special_tokens": False}, 400, "add_special_tokens"),
        ("/tokenize", {"model": "nope", "prompt": "hi"}, 404, "model"),
        ("/detokenize", {"model": "tiny", "tokens": [1, 10**9]}, 400, "tokens"),
        ("/detokenize", {"model": "tiny", "tokens": ["a"]}, 400, "tokens.0"),
    ],
)
def test_bad_requests_are_openai_shaped_errors(tiny_server, path, body, status, param):
    error = _post(tiny_server, path, expect=status, **body).json()["error"]
    assert error["param"] == param, error
