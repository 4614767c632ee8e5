"""vLLM's token fields through the official client on the transformers engine: the token ids
in and out (`return_token_ids`, which RL rollouts send so that nothing is tokenized twice) and
each prompt token's logprob, rank and most likely alternatives (`prompt_logprobs`), in vLLM's
shapes, checked against the model's own logits. (tests/vllm repeats them on vLLM.)"""

from __future__ import annotations

import httpx
import pytest
import torch

HELLO = [{"role": "user", "content": "Hello"}]


def check_prompt_logprobs(scored: list, prompt: list[int], expected: torch.Tensor, tokenizer, num_top: int, tolerance: float = 1e-4) -> None:
    """vLLM's shape: null first (nothing came before it), then per token {id: {logprob, rank,
    decoded_token}} holding the prompt's own token and the num_top most likely."""
    assert len(scored) == len(prompt) and scored[0] is None
    for position, (token_id, entries) in enumerate(zip(prompt[1:], scored[1:]), start=1):
        row = expected[position - 1]
        own = entries[str(token_id)]
        assert own["logprob"] == pytest.approx(float(row[token_id]), abs=tolerance)
        surely_above, maybe_above = int((row > row[token_id] + tolerance).sum()), int((row > row[token_id] - tolerance).sum()) - 1
        assert surely_above + 1 <= own["rank"] <= maybe_above + 1  # 1: the most likely (tokens within the tolerance may go either way)
        assert own["decoded_token"] == tokenizer.decode([token_id])
        best = row.topk(num_top).indices.tolist()
        assert {str(i) for i in best} <= set(entries) and len(entries) in (num_top, num_top + 1)
        assert [entries[str(i)]["rank"] for i in best] == list(range(1, num_top + 1))


def test_completions_return_each_prompts_token_ids_and_scores_in_its_choices(tiny_client, tiny_tokenizer, log_softmax_of):
    prompts = [tiny_tokenizer.encode("The sea is deep"), tiny_tokenizer.encode("Once upon a time there was")]
    completion = tiny_client.completions.create(
        model="tiny", prompt=prompts, max_tokens=5, n=2, temperature=0, extra_body={"return_token_ids": True, "prompt_logprobs": 2, "ignore_eos": True}
    )
    assert len(completion.choices) == 4
    for choice in completion.choices:
        prompt = prompts[choice.index // 2]
        extra = choice.model_extra
        assert extra["prompt_token_ids"] == prompt
        assert len(extra["token_ids"]) == 5 and tiny_tokenizer.decode(extra["token_ids"]) == choice.text
        check_prompt_logprobs(extra["prompt_logprobs"], prompt, log_softmax_of(prompt), tiny_tokenizer, 2)
    assert completion.usage.completion_tokens == 20


def test_chat_returns_the_templated_prompt_ids_and_scores_beside_its_choices(tiny_client, tiny_tokenizer, log_softmax_of):
    chat = tiny_client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0, extra_body={"return_token_ids": True, "prompt_logprobs": 0, "ignore_eos": True})
    prompt = tiny_tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert chat.model_extra["prompt_token_ids"] == prompt
    (choice,) = chat.choices
    assert len(choice.model_extra["token_ids"]) == 6 and tiny_tokenizer.decode(choice.model_extra["token_ids"]) == choice.message.content
    scored = chat.model_extra["prompt_logprobs"]
    expected = log_softmax_of(prompt)
    assert scored[0] is None and all(len(entries) == 1 for entries in scored[1:])  # 0 alternatives: the prompt's own token alone
    assert [entries[str(t)]["logprob"] for t, entries in zip(prompt[1:], scored[1:])] == pytest.approx([float(expected[i, t]) for i, t in enumerate(prompt[1:])], abs=1e-4)


def test_streamed_token_ids_add_up_to_the_whole_answers(tiny_client, tiny_tokenizer):
    """Chat: the prompt's ids beside each opening delta, then each delta's own tokens;
    completions: each choice's first chunk carries its prompt's ids."""
    asked = dict(model="tiny", messages=HELLO, max_tokens=6, temperature=0, n=2, extra_body={"return_token_ids": True, "ignore_eos": True})
    whole = tiny_client.chat.completions.create(**asked)
    prompts, ids = [], {0: [], 1: []}
    for chunk in tiny_client.chat.completions.create(**asked, stream=True):
        if "prompt_token_ids" in chunk.model_extra:
            prompts.append(chunk.model_extra["prompt_token_ids"])
        for choice in chunk.choices:
            ids[choice.index] += choice.model_extra.get("token_ids") or []
    assert prompts == [whole.model_extra["prompt_token_ids"]] * 2
    assert [ids[0], ids[1]] == [c.model_extra["token_ids"] for c in whole.choices]

    prompt = tiny_tokenizer.encode("Hello there")
    firsts, ids = {}, {0: [], 1: []}
    for chunk in tiny_client.completions.create(model="tiny", prompt=[prompt, prompt[:1]], max_tokens=3, temperature=0, stream=True, extra_body={"return_token_ids": True, "ignore_eos": True}):
        for choice in chunk.choices:
            firsts.setdefault(choice.index, choice.model_extra.get("prompt_token_ids"))
            ids[choice.index] += choice.model_extra.get("token_ids") or []
    assert firsts == {0: prompt, 1: prompt[:1]} and [len(ids[0]), len(ids[1])] == [3, 3]


def test_echo_without_generation_returns_the_prompt_ids_and_no_token(tiny_client, tiny_tokenizer):
    prompt = tiny_tokenizer.encode("Score me")
    completion = tiny_client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, extra_body={"return_token_ids": True, "prompt_logprobs": 1})
    extra = completion.choices[0].model_extra
    assert (extra["prompt_token_ids"], extra["token_ids"], len(extra["prompt_logprobs"])) == (prompt, [], len(prompt))
    assert completion.choices[0].text == tiny_tokenizer.decode(prompt)


def test_fields_that_are_not_asked_for_are_not_sent(tiny_client):
    raw = tiny_client.chat.completions.with_raw_response.create(model="tiny", messages=HELLO, max_tokens=2).http_response.json()
    assert not {"prompt_token_ids", "prompt_logprobs"} & set(raw) and "token_ids" not in raw["choices"][0]


def test_logprobs_name_tokens_by_id_when_asked(tiny_client, tiny_tokenizer):
    """`return_tokens_as_token_ids`: "token_id:N" for the chosen tokens and the alternatives
    (chat and completions); `bytes` stays the token's own text's."""
    ids_too = {"return_tokens_as_token_ids": True, "return_token_ids": True, "ignore_eos": True}
    chat = tiny_client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2, extra_body=ids_too)
    (choice,) = chat.choices
    content = choice.logprobs.content
    assert [t.token for t in content] == [f"token_id:{i}" for i in choice.model_extra["token_ids"]]
    assert [bytes(t.bytes) for t in content] == [tiny_tokenizer.decode([i]).encode() for i in choice.model_extra["token_ids"]]
    assert all(len(t.top_logprobs) == 2 and all(top.token.startswith("token_id:") for top in t.top_logprobs) for t in content)
    completion = tiny_client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0, logprobs=1, extra_body=ids_too)
    logprobs, ids = completion.choices[0].logprobs, completion.choices[0].model_extra["token_ids"]
    assert logprobs.tokens == [f"token_id:{i}" for i in ids] and all(next(iter(top)).startswith("token_id:") for top in logprobs.top_logprobs)
    assert logprobs.text_offset[-1] == len(tiny_tokenizer.decode(ids[:-1]))  # offsets count the text, not the names


@pytest.mark.parametrize("stream", [False, True])
def test_alternatives_that_could_not_be_drawn_are_sent_as_vllm_sends_them(tiny_client, stream):
    """Output held to a choice masks nearly every token: the 20 most likely alternatives
    include tokens of probability 0, sent as -9999.0, never as a -inf that JSON cannot hold."""
    asked = dict(model="tiny", messages=HELLO, logprobs=True, top_logprobs=20, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    if stream:
        contents = [t for chunk in tiny_client.chat.completions.create(**asked, stream=True) for c in chunk.choices if c.logprobs for t in c.logprobs.content]
    else:
        contents = tiny_client.chat.completions.create(**asked).choices[0].logprobs.content
    alternatives = [top.logprob for t in contents for top in t.top_logprobs]
    assert contents and min(alternatives) == -9999.0 and all(t.logprob > -9999.0 for t in contents)


@pytest.mark.parametrize(
    "body, message",
    [
        ({"prompt_logprobs": 1, "stream": True}, "not available when stream is true"),
        ({"prompt_logprobs": 21}, "less than or equal to 20"),
        ({"prompt_logprobs": -1}, "greater than or equal to 0"),
        ({"prompt_logprobs": 1, "echo": True, "logprobs": 1}, "not both"),
    ],
)
def test_prompt_logprobs_it_cannot_give_are_refused_with_the_field_named(tiny_server, body, message):
    response = httpx.post(f"{tiny_server.url}/v1/completions", json={"model": "tiny", "prompt": "Hi", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "prompt_logprobs" and message in error["message"]
