"""The transformers engine's prefix cache and chunked prefill through a real server and the
official client: a chat's next turn prefills only what its earlier turns did not, says so in
usage (`cached_tokens`), and answers exactly as a deployment that prefills every prompt whole
and at once; a reload swap forgets the old weights' prefixes."""

from __future__ import annotations

import concurrent.futures
import re
import time

import httpx
import pytest

from models.registry import Registry
from server.config.settings import ModelSpec, Settings
from server.engines.prefix_cache import BLOCK
from tests.conftest import ServerThread

SYSTEM = {"role": "system", "content": "You answer questions about the sea, briefly and kindly, in plain words. " * 4}
TURNS = ["What is the deepest ocean?", "And the saltiest sea?", "Which one is warmest?"]


@pytest.fixture(scope="module")
def server(tiny_model_path, tmp_path_factory):
    """`cached`, `whole` and `chunked` serve the same folder; `whole` keeps no prefixes and
    prefills every prompt at once; `chunked` prefills 16 tokens at a time (from its cached prefix on)."""
    specs = [
        ModelSpec(name="cached", path=tiny_model_path, engine="transformers"),
        ModelSpec(name="whole", path=tiny_model_path, engine="transformers", engine_options={"prefix_cache_mib": 0, "prefill_chunk_tokens": 0}),
        ModelSpec(name="chunked", path=tiny_model_path, engine="transformers", engine_options={"prefill_chunk_tokens": 16}),
    ]
    with ServerThread(Settings(home=tmp_path_factory.mktemp("prefixes"), models=specs)) as running:
        yield running


def _ask(client, model: str, messages: list[dict], max_tokens: int = 6):
    return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0, logprobs=True, top_logprobs=2)


def _cached_tokens(completion) -> int:
    details = completion.usage.prompt_tokens_details
    return details.cached_tokens if details else 0


def test_each_turn_of_a_chat_reuses_the_turns_before_it_and_answers_as_a_whole_prefill(server):
    client = server.client()
    messages, previous_prompt_tokens = [SYSTEM], 0
    for turn, question in enumerate(TURNS):
        messages.append({"role": "user", "content": question})
        cached, whole, chunked = (_ask(client, model, messages, 40) for model in ("cached", "whole", "chunked"))
        for ours in (cached, chunked):
            assert ours.choices[0].message.content == whole.choices[0].message.content
            for token, expected in zip(ours.choices[0].logprobs.content, whole.choices[0].logprobs.content, strict=True):
                assert (token.token, token.logprob) == (expected.token, pytest.approx(expected.logprob, abs=1e-4))
        assert _cached_tokens(chunked) == _cached_tokens(cached)
        assert _cached_tokens(whole) == 0
        reused = _cached_tokens(cached)
        if turn == 0:
            assert reused == 0
        else:  # at least the turns before the last answer, in whole blocks (the random model's answer may not tokenize back the same)
            assert reused % BLOCK == 0 and previous_prompt_tokens - BLOCK < reused < cached.usage.prompt_tokens, (reused, cached.usage.prompt_tokens)
        messages.append({"role": "assistant", "content": cached.choices[0].message.content})
        previous_prompt_tokens = cached.usage.prompt_tokens
    details = httpx.get(f"{server.url}/health").json()["models"]["cached"]["details"]
    kept, reused = re.fullmatch(r"(\d+) prefixes, [\d.]+ of 512 MiB, (\d+) prompt tokens reused", details["prefix_cache"]).groups()
    assert 0 < int(kept) <= 2 * len(TURNS) and int(reused) > 0


def test_a_prompt_that_resends_an_answer_reuses_the_answers_tokens_too(server, tiny_tokenizer):
    """As a chat's next turn does: the first answer's tokens, by id, then more."""
    client = server.client()
    first = client.completions.create(model="cached", prompt=tiny_tokenizer.encode(SYSTEM["content"]), max_tokens=40, temperature=0, extra_body={"return_token_ids": True})
    asked, answered = first.choices[0].model_extra["prompt_token_ids"], first.choices[0].model_extra["token_ids"]
    assert len(answered) == 40
    follow_up = [*asked, *answered, *tiny_tokenizer.encode(" And then?")]
    cached, whole = (client.completions.create(model=model, prompt=follow_up, max_tokens=6, temperature=0, logprobs=2) for model in ("cached", "whole"))
    expected = (len(asked) + len(answered) - 2) // BLOCK * BLOCK  # every token its row held (all but the last drawn), in whole blocks
    assert _cached_tokens(cached) == expected > len(asked)
    assert cached.choices[0].text == whole.choices[0].text
    assert cached.choices[0].logprobs.token_logprobs == pytest.approx(whole.choices[0].logprobs.token_logprobs, abs=1e-4)


def test_prompts_sharing_a_system_prompt_reuse_it_when_they_arrive_together(server):
    """Hits prefill one by one beside the misses of the same step; each answer is its own."""
    client = server.client()
    questions = [f"Name a fish that lives in sea number {n}." for n in range(6)]
    _ask(client, "cached", [SYSTEM, {"role": "user", "content": "Warm up."}])
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        cached = list(pool.map(lambda q: _ask(client, "cached", [SYSTEM, {"role": "user", "content": q}]), questions))
        whole = list(pool.map(lambda q: _ask(client, "whole", [SYSTEM, {"role": "user", "content": q}]), questions))
    assert [c.choices[0].message.content for c in cached] == [w.choices[0].message.content for w in whole]
    assert all(_cached_tokens(c) >= 3 * BLOCK for c in cached)


def test_a_stream_reports_its_cached_tokens_in_its_usage_chunk(server):
    client = server.client()
    messages = [SYSTEM, {"role": "user", "content": TURNS[0]}]
    _ask(client, "cached", messages)
    chunks = list(client.chat.completions.create(model="cached", messages=messages, max_tokens=4, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 3 * BLOCK


def test_a_reload_swap_forgets_the_old_weights_prefixes(two_versions_home):
    home = two_versions_home()
    first = Registry(home).resolve("chat@1")
    spec = ModelSpec(name="chat", path=first.path, version=first.ref, engine="transformers")
    messages = [SYSTEM, {"role": "user", "content": TURNS[0]}]
    with ServerThread(Settings(home=home, models=[spec])) as server:
        client = server.client()
        _ask(client, "chat", messages)
        assert _cached_tokens(_ask(client, "chat", messages)) > 0
        swap = httpx.post(f"{server.url}/admin/deployments/chat/swap", json={"to": "chat@2", "strategy": "reload"}, timeout=120)
        assert swap.status_code == 200, swap.text
        after = client.chat.completions.with_raw_response.create(model="chat", messages=messages, max_tokens=6, temperature=0)
        assert after.headers["x-baton-version"] == "chat@2" and _cached_tokens(after.parse()) == 0  # chat@1's KV is gone
        again = _ask(client, "chat", messages)
        assert _cached_tokens(again) > 0 and again.choices[0].message.content == after.parse().choices[0].message.content


def _cached_metric(server, deployment: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("baton_cached_prompt_tokens_total{") and f'deployment="{deployment}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_the_prompt_tokens_the_cache_held_are_counted_in_the_metrics(server):
    """`baton_cached_prompt_tokens_total` against `baton_prompt_tokens_total`: the hit rate."""
    client = server.client()
    messages = [SYSTEM, {"role": "user", "content": "Is the sea blue?"}]
    before = _cached_metric(server, "cached")
    first, second = _ask(client, "cached", messages), _ask(client, "cached", messages)
    assert _cached_tokens(second) > 0
    assert _cached_metric(server, "cached") - before == _cached_tokens(first) + _cached_tokens(second)


def test_a_crowd_of_mixed_requests_answers_alike_with_and_without_prefixes_and_chunks(server):
    """Twenty greedy requests at once, prompts sharing prefixes of several lengths, some long
    enough to be chunked, some with n=2 or a stop string, and streams left after their first
    chunk: each answer is the same on `chunked` (prefix cache, 16-token chunks) as on `whole`,
    and both engines end with nothing running."""
    client = server.client()
    stems = [SYSTEM["content"], SYSTEM["content"][:90], "Tides and harbours. " * 12]
    asks = [dict(prompt=stems[i % 3] + f" Question {i}: name a ship.", n=1 + (i % 4 == 0), stop=["ship"] if i % 5 == 0 else None) for i in range(20)]

    def answers(model: str) -> list[list[str]]:
        def ask(kwargs) -> list[str]:
            return [choice.text for choice in client.completions.create(model=model, max_tokens=12, temperature=0, **kwargs).choices]

        def leave_early(n: int) -> None:
            with client.completions.create(model=model, prompt=stems[n % 3] + " Go on.", max_tokens=200, temperature=0, stream=True) as stream:
                next(iter(stream))

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            left = [pool.submit(leave_early, n) for n in range(4)]
            asked = list(pool.map(ask, asks))
            for future in left:
                future.result()
        return asked

    assert answers("chunked") == answers("whole")
    for model in ("chunked", "whole"):
        for _ in range(100):
            if httpx.get(f"{server.url}/health").json()["models"][model]["num_running"] == 0:
                break
            time.sleep(0.05)
        assert httpx.get(f"{server.url}/health").json()["models"][model]["num_running"] == 0
    details = httpx.get(f"{server.url}/health").json()["models"]["chunked"]["details"]
    assert details["num_chunked_prefills"] > 0 and not details["prefix_cache"].endswith(" 0 prompt tokens reused")
