"""Limits under load, through a real server: the admission queue and per-key rates."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil

from server.api.rate_limits import RateLimits
from server.config.settings import ModelSpec, Settings
from server.deployments.slot import Lease
from server.auth.keys import key
from tests.conftest import ServerThread
from tests.fake_engine import FakeBehaviour, FakeEngineFactory

HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_4x_overload_gets_only_answers_and_503s_with_retry_after(tiny_model_path, tmp_path):
    """2 running and 4 waiting per deployment; 24 at once: every response is a whole answer
    or a 503 with Retry-After, at once; none times out, none is a 500."""
    settings = Settings(
        home=tmp_path, models=[ModelSpec(name="chat", path=tiny_model_path)], max_running_per_deployment=2, max_waiting=4, max_wait_s=30
    )
    with ServerThread(settings, engine_factory=FakeEngineFactory(default=FakeBehaviour(token_seconds=0.02))) as server:
        body = {"model": "chat", **HI, "max_tokens": 10}
        rss_before = psutil.Process().memory_info().rss
        with ThreadPoolExecutor(24) as pool:
            responses = list(pool.map(lambda _: httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30), range(24)))
        rss_growth = psutil.Process().memory_info().rss - rss_before
        status = httpx.get(f"{server.url}/admin/deployments/chat").json()
    assert rss_growth < 100 << 20, f"memory grew {rss_growth >> 20} MiB under overload"
    answered = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 503]
    assert len(answered) + len(refused) == 24 and len(answered) >= 6
    assert all(r.json()["choices"][0]["finish_reason"] == "length" for r in answered)
    assert all(r.headers["retry-after"] == "5" and r.json()["error"]["code"] == "overloaded" for r in refused)
    assert (status["in_flight"], status["waiting"]) == (0, 0)  # every place given back


def test_a_key_over_its_rate_gets_429_with_retry_after(tiny_model_path, tmp_path):
    keys = [key("slow", "slow-secret", {"inference"}, requests_per_minute=2)]
    settings = Settings(home=tmp_path, models=[ModelSpec(name="chat", path=tiny_model_path)], keys=keys)
    with ServerThread(settings, engine_factory=FakeEngineFactory()) as server:
        ask = lambda: httpx.post(f"{server.url}/v1/chat/completions", json={"model": "chat", **HI}, headers={"authorization": "Bearer slow-secret"})  # noqa: E731
        assert [ask().status_code for _ in range(2)] == [200, 200]
        limited = ask()
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert limited.json()["error"]["type"] == "rate_limit_error"


def test_a_key_in_token_debt_gets_429_until_it_has_paid(tiny_model_path, tmp_path):
    keys = [key("metered", "metered-secret", {"inference"}, tokens_per_minute=10)]
    settings = Settings(home=tmp_path, models=[ModelSpec(name="chat", path=tiny_model_path)], keys=keys)
    with ServerThread(settings, engine_factory=FakeEngineFactory()) as server:
        body = {"model": "chat", **HI, "max_tokens": 8}  # a prompt of 1 token and 8 generated: 9 charged
        ask = lambda: httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"authorization": "Bearer metered-secret"})  # noqa: E731
        assert [ask().status_code for _ in range(2)] == [200, 200]  # the second puts the key 8 tokens in debt
        limited = ask()
    assert limited.status_code == 429 and "10 tokens a minute" in limited.json()["error"]["message"]
    assert int(limited.headers["retry-after"]) >= 1


def test_rates_and_leases_change_on_the_event_loop_only(tiny_model_path, tmp_path, monkeypatch):
    """Admission (the rate buckets) and the lease's release run on the server's event loop,
    never on a worker thread where two requests could race on a bucket: 30 requests at once
    against 10 a minute get exactly 10 answers."""
    threads: set[int] = set()

    def on_thread(method):
        def noted(self, *args):
            threads.add(threading.get_ident())
            return method(self, *args)

        return noted

    monkeypatch.setattr(RateLimits, "admit", on_thread(RateLimits.admit))
    monkeypatch.setattr(Lease, "release", on_thread(Lease.release))
    keys = [key("ten", "ten-secret", {"inference"}, requests_per_minute=10)]
    settings = Settings(home=tmp_path, models=[ModelSpec(name="chat", path=tiny_model_path)], keys=keys)
    with ServerThread(settings, engine_factory=FakeEngineFactory()) as server:
        headers = {"authorization": "Bearer ten-secret"}
        streamed = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "chat", **HI, "stream": True}, headers=headers)
        assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
        with ThreadPoolExecutor(30) as pool:
            ask = lambda _: httpx.post(f"{server.url}/v1/chat/completions", json={"model": "chat", **HI}, headers=headers, timeout=30)  # noqa: E731
            codes = sorted(r.status_code for r in pool.map(ask, range(30)))
    assert codes == [200] * 9 + [429] * 21
    assert len(threads) == 1, "admission or a release ran off the event loop"


CHAT = ("chat/completions", {"model": "chat", **HI, "temperature": 0})


def _finish_order(server, first_blocks: dict, waiting: tuple[str, dict] = CHAT) -> list[str]:
    """While one long chat request holds the only place, a batch key's request and then an app
    key's (`waiting`: a route and its body) wait: the order in which the two finish."""
    finished, lock = [], threading.Lock()

    def ask(secret: str, tag: str, route: str, body: dict) -> None:
        response = httpx.post(f"{server.url}/v1/{route}", json=body, headers={"authorization": f"Bearer {secret}"}, timeout=120)
        assert response.status_code == 200, response.text
        with lock:
            finished.append(tag)

    route, body = waiting
    blocker = threading.Thread(target=ask, args=("app-secret", "blocker", CHAT[0], {**CHAT[1], **first_blocks}))
    blocker.start()
    _wait_until(lambda: _num_running(server) == 1)
    waiters = [threading.Thread(target=ask, args=("batch-secret", "batch", route, body)), threading.Thread(target=ask, args=("app-secret", "app", route, {**body, "priority": -50}))]
    for num_waiting, waiter in enumerate(waiters, start=1):
        waiter.start()
        _wait_until(lambda: _num_waiting(server) == num_waiting)  # the batch request is first in line
    assert finished == [], "the blocker ended before both requests were waiting"
    for thread in [blocker, *waiters]:
        thread.join(timeout=120)
    return finished


def _num_running(server) -> int:
    """Generations the engine runs (a request leased but still tokenizing runs none yet)."""
    return httpx.get(f"{server.url}/health").json()["models"]["chat"]["num_running"]


def _num_waiting(server) -> int:
    """Requests waiting for a place: in the deployment's admission queue, or in its engine's."""
    in_engine = httpx.get(f"{server.url}/health").json()["models"]["chat"]["num_waiting"]
    return httpx.get(f"{server.url}/admin/deployments/chat").json()["waiting"] + in_engine


def _wait_until(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


PRIORITY_KEYS = [key("app", "app-secret", {"inference"}), key("batch", "batch-secret", {"inference"}, priority=10)]


def test_the_admission_queue_serves_the_soonest_priority_first(tiny_model_path, tmp_path):
    settings = Settings(home=tmp_path, models=[ModelSpec(name="chat", path=tiny_model_path)], keys=PRIORITY_KEYS, max_running_per_deployment=1)
    with ServerThread(settings, engine_factory=FakeEngineFactory(default=FakeBehaviour(token_seconds=0.05))) as server:
        assert _finish_order(server, {"max_tokens": 40}) == ["blocker", "app", "batch"]


def test_a_keys_priority_orders_its_embeddings_in_the_admission_queue_too(tiny_model_path, tmp_path):
    """Embeddings wait in the same queue, in their key's order (the app's -50 is its key's 0)."""
    settings = Settings(home=tmp_path, models=[ModelSpec(name="chat", path=tiny_model_path, engine="transformers")], keys=PRIORITY_KEYS, max_running_per_deployment=1)
    with ServerThread(settings) as server:
        embed = ("embeddings", {"model": "chat", "input": ["The sea is deep and wide. " * 40] * 16})  # tens of ms each: the two end apart
        assert _finish_order(server, {"max_tokens": 1500, "ignore_eos": True}, embed) == ["blocker", "app", "batch"]


def test_the_transformers_engine_gives_a_place_in_its_batch_to_the_soonest_priority_first(tiny_model_path, tmp_path):
    """The app key asks for -50 and gets its key's 0, still sooner than the batch key's 10.
    Each waiter answers 100 tokens: two answers of 2 would end a millisecond apart, too close
    for the order their clients hear of them to be the order they ran in."""
    settings = Settings(home=tmp_path, models=[ModelSpec(name="chat", path=tiny_model_path, engine="transformers", max_batch_size=1)], keys=PRIORITY_KEYS)
    with ServerThread(settings) as server:
        waiting = (CHAT[0], {**CHAT[1], "max_tokens": 100, "ignore_eos": True})
        assert _finish_order(server, {"max_tokens": 1500, "ignore_eos": True}, waiting) == ["blocker", "app", "batch"]
