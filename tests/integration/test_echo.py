"""Completions' `echo` through the official client on the transformers engine: the prompt
comes back first, and with `logprobs` each prompt token is scored by the model (what
lm-evaluation-harness sends to score a text: echo, logprobs, max_tokens 0 or 1). The scores
are checked against the model's own logits, prompt by prompt. (tests/vllm repeats it on vLLM.)"""

from __future__ import annotations

import httpx
import pytest
import torch


def _check_scored(logprobs, prompt: list[int], expected: torch.Tensor, tiny_tokenizer, num_top: int) -> None:
    assert logprobs.tokens[: len(prompt)] == [tiny_tokenizer.decode([token_id]) for token_id in prompt]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # nothing came before it
    for position, token_id in enumerate(prompt[1:], start=1):
        assert logprobs.token_logprobs[position] == pytest.approx(float(expected[position - 1, token_id]), abs=1e-4)
        assert list(logprobs.top_logprobs[position].values()) == pytest.approx(expected[position - 1].topk(num_top).values.tolist(), abs=1e-4)


def test_echo_with_max_tokens_0_scores_the_prompt_and_generates_nothing(tiny_client, tiny_tokenizer, log_softmax_of):
    prompt = tiny_tokenizer.encode("The sea is deep and the sky is wide")
    completion = tiny_client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=2, temperature=0)
    choice = completion.choices[0]
    assert choice.text == tiny_tokenizer.decode(prompt)
    assert len(choice.logprobs.tokens) == len(prompt)
    _check_scored(choice.logprobs, prompt, log_softmax_of(prompt), tiny_tokenizer, 2)
    assert choice.logprobs.text_offset[-1] == len("".join(choice.logprobs.tokens[:-1]))
    assert (choice.finish_reason, completion.usage.completion_tokens, completion.usage.prompt_tokens) == ("length", 0, len(prompt))


def test_echo_then_generation_is_the_prompt_then_the_same_answer(tiny_client, tiny_tokenizer, log_softmax_of):
    text = "Once upon a time"
    plain = tiny_client.completions.create(model="tiny", prompt=text, max_tokens=4, logprobs=1, temperature=0)
    echoed = tiny_client.completions.create(model="tiny", prompt=text, max_tokens=4, echo=True, logprobs=1, temperature=0)
    prompt = tiny_tokenizer.encode(text)
    assert echoed.choices[0].text == text + plain.choices[0].text
    logprobs = echoed.choices[0].logprobs
    assert logprobs.tokens == [tiny_tokenizer.decode([t]) for t in prompt] + plain.choices[0].logprobs.tokens
    assert logprobs.token_logprobs[len(prompt) :] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-4)
    _check_scored(logprobs, prompt, log_softmax_of(prompt), tiny_tokenizer, 1)
    assert echoed.usage.completion_tokens == plain.usage.completion_tokens


def test_prompts_of_different_lengths_in_one_request_are_each_scored_as_alone(tiny_client, tiny_tokenizer, log_softmax_of):
    """Each prompt's scores are its own tokens', whatever else the request or the batch holds."""
    prompts = [tiny_tokenizer.encode("Hi"), tiny_tokenizer.encode("A much longer prompt than the other one, by far"), tiny_tokenizer.encode("Mid length words")]
    completion = tiny_client.completions.create(model="tiny", prompt=prompts, max_tokens=1, echo=True, logprobs=3, temperature=0)
    for choice in completion.choices:
        prompt = prompts[choice.index]
        assert choice.text.startswith(tiny_tokenizer.decode(prompt))
        assert len(choice.logprobs.tokens) == len(prompt) + 1
        _check_scored(choice.logprobs, prompt, log_softmax_of(prompt), tiny_tokenizer, 3)


def test_streamed_echo_matches_the_whole_answer(tiny_client):
    asked = dict(model="tiny", prompt="Hello there", max_tokens=3, echo=True, logprobs=1, temperature=0, n=2)
    whole = tiny_client.completions.create(**asked)
    streamed = {0: "", 1: ""}
    tokens = {0: [], 1: []}
    for chunk in tiny_client.completions.create(**asked, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
            tokens[choice.index] += choice.logprobs.tokens if choice.logprobs else []
    assert [streamed[i] for i in (0, 1)] == [c.text for c in whole.choices]
    assert [tokens[i] for i in (0, 1)] == [c.logprobs.tokens for c in whole.choices]
    assert all(c.text.startswith("Hello there") for c in whole.choices)


def test_echo_without_logprobs_has_none_and_max_tokens_0_needs_echo(tiny_client, tiny_server):
    completion = tiny_client.completions.create(model="tiny", prompt="Hello", max_tokens=0, echo=True)
    assert (completion.choices[0].text, completion.choices[0].logprobs) == ("Hello", None)
    refused = httpx.post(f"{tiny_server.url}/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 0})
    assert refused.status_code == 400 and "echo" in refused.json()["error"]["message"]
    assert refused.json()["error"]["param"] == "max_tokens"
