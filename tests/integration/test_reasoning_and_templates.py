"""A reasoning model's thinking read apart from its answer, and the chat template's
request fields (variables, a prefilled answer), through a real server (transformers engine)
and the openai client. The model is SmolLM2 with a thinking chat
template (Qwen3's shape: the prompt opens `<think>` unless `enable_thinking` is false), so
everything it writes after an opened tag is its reasoning: real weights, real template."""

from __future__ import annotations

import httpx
import pytest

from models.catalog import Change
from models.registry import ImportOptions, Registry
from server.config.settings import ModelSpec, Settings
from tests.conftest import ServerThread, copy_with

THINKING_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message.reasoning_content %}{{ '<think>' + message.reasoning_content + '</think>' }}{% endif %}"
    "{{ message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is not defined or enable_thinking %}{{ '<think>\\n' }}{% endif %}{% endif %}"
)
HELLO = [{"role": "user", "content": "What is the capital of France?"}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_model_path):
    home = tmp_path_factory.mktemp("home")
    folder = copy_with(demo_model_path, tmp_path_factory.mktemp("thinker") / "model", chat_template=THINKING_TEMPLATE)
    registry = Registry(home)
    registry.import_folder(folder, "thinker", {"kind": "local"}, ImportOptions(), Change("tester"))
    version = registry.resolve("thinker@1")
    spec = ModelSpec(name="thinker", path=version.path, version=version.ref, engine="transformers")
    with ServerThread(Settings(home=home, models=[spec])) as running:
        yield running


def test_thinking_is_the_messages_reasoning_and_enable_thinking_false_answers_in_content(server):
    client = server.client()
    answer = client.chat.completions.create(model="thinker", messages=HELLO, temperature=0, max_tokens=12)
    thinking = answer.choices[0]
    assert thinking.message.reasoning and thinking.message.content == ""  # the model never closed its <think>
    assert answer.usage.completion_tokens_details.reasoning_tokens == answer.usage.completion_tokens

    plain = client.chat.completions.create(model="thinker", messages=HELLO, temperature=0, max_tokens=12, extra_body=NO_THINKING)
    assert plain.choices[0].message.content and getattr(plain.choices[0].message, "reasoning", None) is None
    assert plain.usage.completion_tokens_details is None

    chunks = list(client.chat.completions.create(model="thinker", messages=HELLO, temperature=0, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == thinking.message.reasoning
    assert not any(d.content for d in deltas)
    assert chunks[-1].usage.model_dump(exclude={"prompt_tokens_details"}) == answer.usage.model_dump(exclude={"prompt_tokens_details"})  # the second reads the prefix cache


def test_the_responses_api_answers_thinking_as_a_reasoning_item_whole_and_streamed(server):
    client = server.client()
    answer = client.responses.create(model="thinker", input="What is the capital of France?", temperature=0, max_output_tokens=12)
    (item,) = answer.output
    assert item.type == "reasoning" and item.content[0].type == "reasoning_text" and item.content[0].text
    assert answer.usage.output_tokens_details.reasoning_tokens == answer.usage.output_tokens  # it never left its thinking
    events = list(client.responses.create(model="thinker", input="What is the capital of France?", temperature=0, max_output_tokens=12, stream=True))
    deltas = [e.delta for e in events if e.type == "response.reasoning_text.delta"]
    assert "".join(deltas) == item.content[0].text
    assert [e.text for e in events if e.type == "response.reasoning_text.done"] == [item.content[0].text]
    # sent back as input (the SDK's way of keeping a conversation), it is accepted
    follow_up = client.responses.create(model="thinker", input=[*answer.output, {"role": "user", "content": "And of Spain?"}], max_output_tokens=4, temperature=0)
    assert follow_up.status == "incomplete"


def test_the_messages_api_answers_thinking_as_a_thinking_block_and_disabled_turns_it_off(server):
    client = server.anthropic_client()
    request = dict(model="thinker", messages=HELLO, max_tokens=12, extra_body={"temperature": 0})
    chat = server.client().chat.completions.create(model="thinker", messages=HELLO, temperature=0, max_tokens=12).choices[0].message
    answer = client.messages.create(**request)
    assert [(block.type, block.thinking) for block in answer.content] == [("thinking", chat.reasoning)]
    with client.messages.stream(**request) as stream:
        deltas = "".join(event.delta.thinking for event in stream if event.type == "content_block_delta")
    assert deltas == chat.reasoning
    plain = client.messages.create(**request, thinking={"type": "disabled"})
    assert [block.type for block in plain.content] == ["text"]
    sent_back = [*HELLO, {"role": "assistant", "content": answer.content}, {"role": "user", "content": "And of Spain?"}]
    follow_up = client.messages.create(model="thinker", messages=sent_back, max_tokens=4, extra_body={"temperature": 0})
    assert follow_up.content and follow_up.stop_reason in ("max_tokens", "end_turn")  # its thinking, sent back, is accepted


def _thought_in_prompt(prompt: list[int], tokenizer) -> int:
    """The prompt's tokens after its last <think>: they count against the budget (vLLM's rule)."""
    opening = tokenizer.encode("<think>", add_special_tokens=False)
    starts = [i for i in range(len(prompt)) if prompt[i : i + len(opening)] == opening]
    return len(prompt) - starts[-1] - len(opening)


@pytest.mark.parametrize("budget", [0, 3, 6])
def test_a_thinking_budget_closes_the_thought_after_that_many_tokens_and_the_answer_follows(server, demo_model_path, budget):
    from transformers import AutoTokenizer

    tokenizer, client = AutoTokenizer.from_pretrained(demo_model_path), server.client()
    asked = dict(model="thinker", messages=HELLO, temperature=0, max_tokens=20)
    answer = client.chat.completions.create(**asked, extra_body={"thinking_token_budget": budget, "return_token_ids": True, "ignore_eos": True})
    choice, closing = answer.choices[0], tokenizer.encode("</think>", add_special_tokens=False)
    thought = max(budget - _thought_in_prompt(answer.model_extra["prompt_token_ids"], tokenizer), 0)  # a spent budget closes it at once
    token_ids = choice.model_extra["token_ids"]
    assert token_ids[thought : thought + len(closing)] == closing, tokenizer.decode(token_ids)
    assert choice.message.content and (getattr(choice.message, "reasoning", None) or "") == tokenizer.decode(token_ids[:thought])
    streamed = list(client.chat.completions.create(**asked, stream=True, extra_body={"thinking_token_budget": budget, "ignore_eos": True}))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == choice.message.content
    for unbounded in (-1, 2**63 - 1):  # no budget, and one beyond any context
        answer = client.chat.completions.create(**asked, extra_body={"thinking_token_budget": unbounded, "ignore_eos": True}).choices[0]
        assert answer.message.content == ""  # without a budget, this model never closes its thought


def test_completions_hold_a_prompt_that_opens_a_thought_to_the_budget(server, demo_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n<think>\nThe"
    extra = {"thinking_token_budget": 4, "return_token_ids": True, "ignore_eos": True}
    choice = server.client().completions.create(model="thinker", prompt=prompt, temperature=0, max_tokens=10, extra_body=extra).choices[0]
    thought, closing = 4 - _thought_in_prompt(tokenizer.encode(prompt), tokenizer), tokenizer.encode("</think>", add_special_tokens=False)
    assert choice.model_extra["token_ids"][thought : thought + len(closing)] == closing and "</think>" in choice.text


def test_a_thinking_budget_asks_nothing_of_a_closed_thought_or_an_output_held_to_a_grammar(server):
    client = server.client()
    plain = dict(model="thinker", messages=HELLO, temperature=0, max_tokens=12, extra_body={**NO_THINKING})
    budgeted = dict(plain, extra_body={**NO_THINKING, "thinking_token_budget": 0})
    assert client.chat.completions.create(**budgeted).choices[0].message.content == client.chat.completions.create(**plain).choices[0].message.content
    held = client.chat.completions.create(model="thinker", messages=HELLO, max_tokens=12, response_format={"type": "json_object"}, extra_body={"thinking_token_budget": 0})
    assert held.choices[0].message.content.startswith("{")
    refused = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "thinker", "messages": HELLO, "thinking_token_budget": -2})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "thinking_token_budget", refused.text


def test_json_output_and_reasoning_parser_none_leave_everything_in_content(server):
    client = server.client()
    forced = client.chat.completions.create(model="thinker", messages=HELLO, max_tokens=12, response_format={"type": "json_object"}).choices[0]
    assert forced.message.content.startswith("{") and getattr(forced.message, "reasoning", None) is None

    swap = httpx.post(f"{server.url}/admin/deployments/thinker/swap", json={"to": "thinker@1", "engine_options": {"engine": "transformers", "reasoning_parser": "none"}}, timeout=120).json()
    assert (swap["status"], swap["strategy"]) == ("succeeded", "in-place"), swap
    try:
        raw = client.chat.completions.create(model="thinker", messages=HELLO, temperature=0, max_tokens=12).choices[0]
        assert raw.message.content and getattr(raw.message, "reasoning", None) is None
    finally:
        httpx.post(f"{server.url}/admin/deployments/thinker/swap", json={"to": "thinker@1", "engine_options": {"engine": "transformers"}}, timeout=120)


def test_earlier_reasoning_and_template_variables_reach_the_template(server):
    def count(**body) -> int:
        return httpx.post(f"{server.url}/tokenize", json={"model": "thinker", **body}).json()["count"]

    said = [*HELLO, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Thanks"}]
    with_thinking = [*HELLO, {"role": "assistant", "content": "Paris.", "reasoning": "France's capital is Paris."}, {"role": "user", "content": "Thanks"}]
    assert count(messages=with_thinking) > count(messages=said)
    assert count(messages=HELLO, **NO_THINKING) < count(messages=HELLO)


def test_continue_final_message_prefills_the_answer_and_returns_only_what_follows(server):
    prefilled = [*HELLO, {"role": "assistant", "content": "The capital of France is"}]
    answer = server.client().chat.completions.create(
        model="thinker", messages=prefilled, temperature=0, max_tokens=3, extra_body={"add_generation_prompt": False, "continue_final_message": True}
    )
    assert answer.choices[0].message.content.startswith(" Paris"), answer.choices[0].message
    for body, fragment in (({"continue_final_message": True}, "cannot both be true"), ({"messages": HELLO, "add_generation_prompt": False, "continue_final_message": True}, "must be the assistant's")):
        refused = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "thinker", "messages": prefilled, **body})
        assert refused.status_code == 400 and fragment in refused.json()["error"]["message"], refused.text


@pytest.mark.parametrize("kwargs", [{"tokenize": True}, {"chat_template": "{{ 'x' }}"}, {"not a name": 1}])
def test_template_variables_that_would_change_how_the_template_is_applied_are_a_400(server, kwargs):
    answer = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "thinker", "messages": HELLO, "chat_template_kwargs": kwargs})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "chat_template_kwargs", answer.text


def test_reasoning_effort_none_turns_thinking_off_and_chat_template_kwargs_win(server):
    """vLLM's rule: reasoning_effort is a template variable and sets enable_thinking (off for
    "none"); an enable_thinking the request names itself wins."""

    def count(**body) -> int:
        return httpx.post(f"{server.url}/tokenize", json={"model": "thinker", "messages": HELLO, **body}).json()["count"]

    assert count(reasoning_effort="none") == count(**NO_THINKING) < count(reasoning_effort="low") == count()
    assert count(reasoning_effort="none", chat_template_kwargs={"enable_thinking": True}) == count()
    client = server.client()
    plain = client.chat.completions.create(model="thinker", messages=HELLO, temperature=0, max_tokens=12, reasoning_effort="none")
    assert plain.choices[0].message.content and getattr(plain.choices[0].message, "reasoning", None) is None

    answer = client.responses.create(model="thinker", input="What is the capital of France?", temperature=0, max_output_tokens=12, reasoning={"effort": "none"})
    assert [item.type for item in answer.output] == ["message"] and answer.reasoning.effort == "none"
    thinking = client.responses.create(model="thinker", input="What is the capital of France?", temperature=0, max_output_tokens=12, reasoning={"effort": "high"})
    assert thinking.output[0].type == "reasoning"


@pytest.mark.parametrize(
    "route, body, param",
    [
        ("/v1/chat/completions", {"messages": HELLO, "reasoning_effort": "extreme"}, "reasoning_effort"),
        ("/v1/responses", {"input": "Hi", "reasoning": {"effort": "extreme"}}, "reasoning.effort"),
        ("/v1/responses", {"input": "Hi", "reasoning": {"effort": "low", "summary": "auto"}}, "reasoning.summary"),
    ],
)
def test_an_effort_no_server_knows_or_a_summary_is_a_400(server, route, body, param):
    answer = httpx.post(f"{server.url}{route}", json={"model": "thinker", **body})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text
