"""The OpenAI surface beyond plain text, through the official client against a real server
on the transformers engine: logprobs, penalties, logit_bias, structured output (JSON schema,
JSON object, the SDK's parse helper), token-id prompts, the completions default, one
model's card, continuous usage. (tests/vllm repeats the engine
parts on vLLM.)"""

from __future__ import annotations

import json
import re
from collections import Counter

import httpx
import jsonschema
import openai
import pytest
import torch
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer

HI = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return tiny_server.client()  # closed with the server (an unclosed pool warns at exit)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


def _greedy_tokens(client, prompt: list[int] | str, max_tokens: int = 12, model: str = "tiny", **extra) -> list[str]:
    completion = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=0, **extra)
    return completion.choices[0].logprobs.tokens


def test_chat_logprobs_have_openai_shape_sorted_alternatives_and_one_entry_per_token(client):
    answer = client.chat.completions.create(model="tiny", messages=HI, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    for entry in content:
        alternatives = [t.logprob for t in entry.top_logprobs]
        assert len(alternatives) == 3 and alternatives == sorted(alternatives, reverse=True)
        assert entry.logprob == pytest.approx(alternatives[0])  # greedy takes the most likely
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob <= 0.0


def test_logprobs_are_the_models_own(client, tiny_model_path, tokenizer):
    """The first token's logprob equals log-softmax of the model's logits for the prompt."""
    prompt = tokenizer.encode("The sea is")
    completion = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0, logprobs=2)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.inference_mode():
        expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), dim=-1)
    logprobs = completion.choices[0].logprobs
    best = int(expected.argmax())
    assert logprobs.tokens == [tokenizer.decode([best])]
    assert logprobs.token_logprobs[0] == pytest.approx(float(expected[best]), abs=1e-4)
    assert list(logprobs.top_logprobs[0].values()) == pytest.approx(expected.topk(2).values.tolist(), abs=1e-4)
    assert logprobs.text_offset == [0]


def test_logprobs_stay_the_models_own_under_temperature_bias_and_penalties(client, tiny_model_path, tokenizer):
    """As vLLM reports them (`raw_logprobs`): sampling settings change what is drawn, never
    the logprobs reported for it."""
    prompt = tokenizer.encode("The sea is")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with torch.inference_mode():
        expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), dim=-1)
    favoured = int(expected.argmin())  # the least likely token, made all but certain by its bias
    completion = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=1, temperature=1.7, seed=3, frequency_penalty=1.5, logprobs=2, logit_bias={str(favoured): 100}
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs.tokens == [tokenizer.decode([favoured])]
    assert logprobs.token_logprobs[0] == pytest.approx(float(expected[favoured]), abs=1e-4)
    assert list(logprobs.top_logprobs[0].values()) == pytest.approx(expected.topk(2).values.tolist(), abs=1e-4)


def test_streamed_logprobs_match_the_whole_answer(client):
    whole = client.chat.completions.create(model="tiny", messages=HI, max_tokens=8, temperature=0, logprobs=True)
    stream = client.chat.completions.create(model="tiny", messages=HI, max_tokens=8, temperature=0, logprobs=True, stream=True)
    streamed = [entry for chunk in stream for choice in chunk.choices if choice.logprobs for entry in choice.logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole.choices[0].logprobs.content]


def test_no_logprobs_unless_asked(client):
    answer = client.chat.completions.create(model="tiny", messages=HI, max_tokens=2, logprobs=False)
    assert answer.choices[0].logprobs is None


def test_logit_bias_minus_100_bans_a_token_and_plus_100_forces_one(client, tokenizer):
    prompt = tokenizer.encode("Once upon a time")
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0)
    first = tokenizer.encode(plain.choices[0].text, add_special_tokens=False)[0]
    banned = _greedy_tokens(client, prompt, max_tokens=1, logit_bias={str(first): -100})
    assert banned != [tokenizer.decode([first])]
    forced = _greedy_tokens(client, prompt, max_tokens=5, logit_bias={"1000": 100})
    assert forced == [tokenizer.decode([1000])] * 5


def test_penalties_stop_greedy_repetition(smol_server):
    """SmolLM2 (real weights) repeats a repetitive prompt greedily; penalties break it."""
    smol = smol_server.client()
    prompt = "Write the word cat ten times: cat cat cat"
    plain = _greedy_tokens(smol, prompt, max_tokens=16, model="smollm2")
    penalised = _greedy_tokens(smol, prompt, max_tokens=16, model="smollm2", frequency_penalty=2.0, presence_penalty=2.0)
    most_repeated = lambda tokens: Counter(tokens).most_common(1)[0][1]  # noqa: E731
    assert most_repeated(plain) >= 8, plain
    assert most_repeated(penalised) < most_repeated(plain) / 2, penalised


def test_token_id_prompts_one_or_many(client, tokenizer):
    one = tokenizer.encode("Hello")
    single = client.completions.create(model="tiny", prompt=one, max_tokens=2, temperature=0)
    many = client.completions.create(model="tiny", prompt=[one, tokenizer.encode("Bye")], max_tokens=2, temperature=0)
    assert single.usage.prompt_tokens == len(one)
    assert len(many.choices) == 2 and many.choices[0].text == single.choices[0].text


def test_a_token_id_outside_the_vocabulary_is_a_400_naming_the_prompt(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="tiny", prompt=[1, 10**9], max_tokens=2)
    assert refused.value.body["param"] == "prompt" and "vocabulary" in refused.value.body["message"]


def test_completions_default_to_16_tokens_as_openai_does(client):
    completion = client.completions.create(model="tiny", prompt="Hello", temperature=0)
    assert completion.usage.completion_tokens <= 16
    assert completion.choices[0].finish_reason == "length" or completion.usage.completion_tokens < 16


def test_one_models_card_and_a_404_for_an_unknown_one(client):
    card = client.models.retrieve("tiny").model_dump()
    assert (card["id"], card["owned_by"], card["root"]) == ("tiny", "baton", "local")
    assert isinstance(card["max_model_len"], int) and card["max_model_len"] > 0
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_continuous_usage_counts_up_on_every_chunk(client):
    stream = client.chat.completions.create(
        model="tiny", messages=HI, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}
    )
    counts = [chunk.usage.completion_tokens for chunk in stream]
    assert counts == sorted(counts) and counts[-1] == 6 and len(counts) > 2


SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "location": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}}, "required": ["lat", "lon"]},
        },
        "required": ["city", "location"],
    },
    "enum": {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}}, "required": ["colour"]},
    "array": {"type": "object", "properties": {"fruits": {"type": "array", "items": {"type": "string"}, "maxItems": 3}}, "required": ["fruits"]},
}


def json_schema_answers(client, model: str, stream: bool) -> dict[str, object]:
    """Each schema's answer, parsed; shared with tests/vllm."""
    answers = {}
    for name, schema in SCHEMAS.items():
        messages = [{"role": "user", "content": f"Answer in JSON: {name}"}]
        response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
        request = dict(model=model, messages=messages, max_tokens=120, temperature=0, response_format=response_format)
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**request, stream=True) if c.choices)
        else:
            text = client.chat.completions.create(**request).choices[0].message.content
        answers[name] = json.loads(text)
    return answers


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_json_schema_answers_parse_and_validate(smol_server, stream):
    smol = smol_server.client()
    for name, answer in json_schema_answers(smol, "smollm2", stream).items():
        jsonschema.validate(answer, SCHEMAS[name])


def test_json_object_answers_parse(smol_server):
    answer = smol_server.client().chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Is the sky blue? Reply in JSON with one key, answer."}], max_tokens=120, temperature=0, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


STRUCTURED = {
    "choice": ({"choice": ["positive", "negative", "neutral"]}, lambda text: text in ("positive", "negative", "neutral")),
    "regex": ({"regex": r"\d{3}-\d{4}"}, lambda text: re.fullmatch(r"\d{3}-\d{4}", text)),
    "ebnf": ({"grammar": 'root ::= "yes" | "no"'}, lambda text: text in ("yes", "no")),
    "lark": ({"grammar": 'start: "red" | "green" | "blue"'}, lambda text: text in ("red", "green", "blue")),
    "json": ({"json": SCHEMAS["enum"]}, lambda text: jsonschema.validate(json.loads(text), SCHEMAS["enum"]) is None),
}


def assert_structured_outputs_hold(client, model: str) -> None:
    """vLLM's structured_outputs, each kind on chat and completions, whole and streamed:
    every answer is what its constraint allows (shared with tests/vllm)."""
    for name, (constraint, holds) in STRUCTURED.items():
        body = dict(model=model, max_tokens=40, temperature=0, extra_body={"structured_outputs": constraint})
        chat = dict(body, messages=[{"role": "user", "content": f"Answer with {name}: is the sky blue? What is your phone number?"}])
        answers = [
            client.chat.completions.create(**chat).choices[0].message.content,
            "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**chat, stream=True) if c.choices),
            client.completions.create(**body, prompt="The answer is").choices[0].text,
        ]
        for answer in answers:
            assert holds(answer), (name, answer)


def test_structured_outputs_hold_a_choice_regex_grammar_or_schema(smol_server):
    assert_structured_outputs_hold(smol_server.client(), "smollm2")


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"structured_outputs": {"choice": ["a"], "regex": "a"}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", ""),
        ({"structured_outputs": {"choice": ["a", ""]}}, "structured_outputs.choice", "1 to 1024 characters"),
        ({"structured_outputs": {"json": {"type": "objekt"}}}, "structured_outputs.json", "not a valid JSON schema"),
        ({"structured_outputs": {"json_object": False}}, "structured_outputs.json_object", ""),
        ({"structured_outputs": {"regex": "a", "disable_any_whitespace": True}}, "structured_outputs.disable_any_whitespace", ""),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "regular expression cannot be used"),
        ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs", "grammar cannot be used"),
        ({"structured_outputs": {"grammar": "root ::= root"}}, "structured_outputs", "accepts no answer"),
        ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}}, None, "cannot be combined"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_a_bad_structured_outputs_is_a_400_naming_it(tiny_server, extra, param, words, stream):
    """Streamed too: what the engine finds (a regex it cannot compile) is the status, not an error event after a 200."""
    refused = httpx.post(f"{tiny_server.url}/v1/chat/completions", json={"model": "tiny", "messages": HI, "max_tokens": 4, "stream": stream, **extra})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (param is None or error["param"] == param) and words in error["message"], error


def test_the_sdk_parse_helper_fills_a_pydantic_model(smol_server):
    class Person(BaseModel):
        name: str
        age: int

    parsed = smol_server.client().beta.chat.completions.parse(
        model="smollm2", messages=[{"role": "user", "content": "Alice is 30 years old. Extract the person."}], max_tokens=80, temperature=0, response_format=Person
    )
    assert parsed.choices[0].message.parsed == Person(name="Alice", age=30)


def test_a_malformed_schema_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=HI, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}})
    assert refused.value.body["param"] == "response_format.json_schema.schema"
    assert "not a valid JSON schema" in refused.value.body["message"]
    huge = {"type": "object", "properties": {f"field_{i}": {"type": "string", "description": "x" * 100} for i in range(400)}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=HI, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": huge}})
    assert refused.value.body["param"] == "response_format.json_schema.schema" and "at most 32768" in refused.value.body["message"]


def _nested(schema: dict, depth: int) -> dict:
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"type": "array", "items": {"type": "integer"}, "minItems": 10**8}, "minItems is 100000000; at most 10000"),
        ({"type": "object", "properties": {"code": {"type": "string", "pattern": "^a{100000}$"}}}, "repeats 100000 times; at most 1000"),
        ({"type": "object", "properties": {"maxLength": {"type": "string", "maxLength": 80}}}, None),  # a property named like a keyword
        (_nested({"type": "string"}, 500), "nests 501 levels deep; at most 64"),
        ({"type": "string", "pattern": r"^\{2000}$"}, None),  # an escaped brace: the literal text {2000}
        ({"type": "string", "pattern": r"^\\{2000}$"}, "repeats 2000 times"),  # an escaped backslash, then a quantifier
    ],
)
def test_a_schema_whose_grammar_would_be_unbounded_is_a_400_before_any_engine_sees_it(client, schema, words):
    """A grammar grows with a schema's counts; vLLM checks schemas in the event loop, where a
    minItems of 10^8 held every request for 28 s."""
    body = {"model": "tiny", "messages": HI, "max_tokens": 4, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
    if words is None:
        assert client.chat.completions.create(**body).choices[0].finish_reason in ("stop", "length")
        return
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**body)
    assert refused.value.body["param"] == "response_format.json_schema.schema" and words in refused.value.body["message"]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": schema}}}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=HI, tools=[tool], tool_choice="required")
    assert refused.value.body["param"] == "tools.0.function.parameters"


def test_the_grammar_holds_against_a_bias_toward_a_forbidden_token(client, tokenizer):
    """logit_bias cannot push a token the schema forbids: the mask is applied last."""
    brace = tokenizer.encode("}", add_special_tokens=False)[0]
    answer = client.chat.completions.create(
        model="tiny", messages=HI, max_tokens=3, temperature=0, logit_bias={str(brace): 100}, response_format={"type": "json_object"}
    )
    assert answer.choices[0].message.content.startswith("{")


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"],
            },
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
]
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def forced_tool_calls(client, model: str) -> dict[str, list]:
    """The calls a named and a required tool_choice return, whole and streamed; shared with tests/vllm."""
    request = dict(model=model, messages=WEATHER_QUESTION, tools=TOOLS, max_tokens=80, temperature=0)
    found = {}
    for name, choice in (("named", NAMED), ("required", "required")):
        answer = client.chat.completions.create(**request, tool_choice=choice).choices[0]
        assert answer.finish_reason == "tool_calls" and answer.message.content is None
        found[name] = answer.message.tool_calls
        chunks = list(client.chat.completions.create(**request, tool_choice=choice, stream=True))
        streamed = _streamed_calls(chunks)
        assert [(name_, arguments) for _, name_, arguments in streamed] == [(c.function.name, c.function.arguments) for c in found[name]]
        assert all(call_id.startswith("call_") for call_id, _, _ in streamed)
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        # both stream their arguments as they are generated, not in one piece
        assert sum(bool(c.choices and c.choices[0].delta.tool_calls) for c in chunks) > 1
    return found


def _streamed_calls(chunks) -> list[tuple[str, str, str]]:
    """Calls put together from their deltas, as a client does: (id, name, arguments)."""
    calls: dict[int, list[str]] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(delta.index, [delta.id, delta.function.name, ""])
            call[2] += delta.function.arguments or ""
    return [tuple(call) for _, call in sorted(calls.items())]


def assert_valid_calls(calls) -> None:
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
    assert calls
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_named_and_required_tool_choices_return_valid_calls(smol_server):
    found = forced_tool_calls(smol_server.client(), "smollm2")
    assert [c.function.name for c in found["named"]] == ["get_weather"]
    assert_valid_calls(found["named"])
    assert_valid_calls(found["required"])


def test_a_tool_answer_follows_up(smol_server):
    client = smol_server.client()
    call = client.chat.completions.create(model="smollm2", messages=WEATHER_QUESTION, tools=TOOLS, tool_choice=NAMED, max_tokens=80, temperature=0).choices[0].message
    follow_up = [*WEATHER_QUESTION, call.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": "18 degrees and sunny"}]
    answer = client.chat.completions.create(model="smollm2", messages=follow_up, tools=TOOLS, max_tokens=30, temperature=0).choices[0]
    assert answer.message.content and answer.finish_reason in ("stop", "length")


def test_tool_choice_none_answers_in_text(smol_server):
    answer = smol_server.client().chat.completions.create(model="smollm2", messages=WEATHER_QUESTION, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0)
    assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]}, "tools.0.function.parameters"),
    ],
)
def test_bad_tool_fields_are_400s_naming_them(client, fields, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=2, **fields)
    assert refused.value.body["param"] == param


def test_a_versions_tool_parser_reads_its_auto_answers(tiny_model_path, tokenizer, tmp_path):
    """Deployments of one model, forced to answer `{{{{{{` (logit_bias): read as hermes (what
    SmolLM2's template leaves) the braces stream as they come; read as llama3_json, named by
    `tool_parser` or taught by the chat template (Llama 3's marks <|python_tag|>), an answer
    opening with `{` may be a call, so it is held, and given back whole when it is not one."""
    import shutil

    from server.config.settings import ModelSpec, Settings
    from tests.conftest import ServerThread

    taught = shutil.copytree(tiny_model_path, tmp_path / "taught")
    template = taught / "chat_template.jinja"
    template.write_text(template.read_text() + "{#- tools are called after <|python_tag|> -#}")
    (brace,) = tokenizer.encode("{", add_special_tokens=False)
    specs = [
        ModelSpec(name="hermes", path=tiny_model_path, engine="transformers"),
        ModelSpec(name="llama", path=tiny_model_path, engine="transformers", engine_options={"tool_parser": "llama3_json"}),
        ModelSpec(name="taught", path=taught, engine="transformers"),
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]
    with ServerThread(Settings(home=tmp_path, models=specs)) as server:
        client = server.client()

        def contents(model: str) -> list[str]:
            stream = client.chat.completions.create(
                model=model, messages=HI, tools=tools, max_tokens=6, temperature=0, logit_bias={str(brace): 100}, stream=True
            )
            return [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]

        assert contents("hermes") == ["{"] * 6
        assert contents("llama") == contents("taught") == ["{" * 6]
