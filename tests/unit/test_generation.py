from __future__ import annotations

import pytest

from models.errors import ContextLengthExceededError
from server.api.generation import CachedTokens, ChoiceChunk, build_requests, resolve_max_tokens
from server.api.schemas import CompletionRequest
from server.engines.base import Chunk


def test_max_tokens_defaults_to_the_room_left():
    assert resolve_max_tokens(None, num_prompt_tokens=10, max_model_len=100, prompt_param="prompt") == 90


def test_max_tokens_that_fits_is_kept():
    assert resolve_max_tokens(90, num_prompt_tokens=10, max_model_len=100, prompt_param="prompt") == 90


def test_max_tokens_over_the_context_is_refused_with_counts():
    with pytest.raises(ContextLengthExceededError, match=r"101 tokens \(10 in the prompt, 91 in the completion\)"):
        resolve_max_tokens(91, num_prompt_tokens=10, max_model_len=100, prompt_param="prompt")


def test_prompt_that_fills_the_context_is_refused():
    with pytest.raises(ContextLengthExceededError, match="resulted in 100 tokens"):
        resolve_max_tokens(None, num_prompt_tokens=100, max_model_len=100, prompt_param="prompt")


def test_requests_are_prompt_major_with_consecutive_seeds():
    body = CompletionRequest(model="m", prompt=["a", "b"], n=2, seed=5, max_tokens=3, stop="x")
    requests = build_requests(body, [[1], [2, 3]], max_model_len=50)
    assert [list(r.prompt_token_ids) for r in requests] == [[1], [1], [2, 3], [2, 3]]
    assert [r.sampling.seed for r in requests] == [5, 6, 5, 6]
    assert all(r.sampling.stop == ("x",) for r in requests)
    assert len({r.request_id for r in requests}) == 4


def test_engine_choice_rejects_unknown_engines(tiny_model_path):
    from server.engines.factory import build_engine
    from models.errors import ConfigError

    with pytest.raises(ConfigError, match="Unknown engine"):
        build_engine(tiny_model_path, {"engine": "tensorrt"})
    assert build_engine(tiny_model_path, {"engine": "transformers"}).name == "transformers"


def test_server_limits_on_prompt_and_completion_tokens():
    from models.errors import InvalidRequestError

    body = CompletionRequest(model="m", prompt=["a"], max_tokens=None)
    (request,) = build_requests(body, [[1, 2]], max_model_len=100, max_completion_tokens=10)
    assert request.sampling.max_tokens == 10  # the cap is also the default
    with pytest.raises(InvalidRequestError, match="at most 10 on this server") as too_many:
        build_requests(CompletionRequest(model="m", prompt=["a"], max_tokens=11), [[1]], max_model_len=100, max_completion_tokens=10)
    assert too_many.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError, match="has 3 tokens; this server accepts at most 2") as too_long:
        build_requests(body, [[1, 2, 3]], max_model_len=100, max_prompt_tokens=2)
    assert too_long.value.code == "prompt_too_long"


def test_sampling_is_the_requests_then_the_versions_then_openais():
    from server.api.schemas import ChatCompletionRequest
    from server.engines.generation_config import SamplingDefaults

    messages = [{"role": "user", "content": "hi"}]
    defaults = SamplingDefaults(temperature=0.6, top_k=20, top_p=0.95, repetition_penalty=1.1, max_tokens=7)
    (plain,) = build_requests(ChatCompletionRequest(model="m", messages=messages), [[1, 2]], max_model_len=50, defaults=defaults)
    assert (plain.sampling.temperature, plain.sampling.top_k, plain.sampling.top_p, plain.sampling.repetition_penalty) == (0.6, 20, 0.95, 1.1)
    assert (plain.sampling.min_p, plain.sampling.presence_penalty, plain.sampling.max_tokens) == (0.0, 0.0, 7)

    body = ChatCompletionRequest(model="m", messages=messages, temperature=0, top_k=-1, top_p=None, min_p=0.2, max_tokens=30)
    (own,) = build_requests(body, [[1, 2]], max_model_len=50, defaults=defaults)
    assert (own.sampling.temperature, own.sampling.top_k, own.sampling.top_p, own.sampling.min_p, own.sampling.max_tokens) == (0.0, 0, 0.95, 0.2, 30)

    (neutral,) = build_requests(ChatCompletionRequest(model="m", messages=messages), [[1, 2]], max_model_len=50)
    assert (neutral.sampling.temperature, neutral.sampling.top_p, neutral.sampling.top_k, neutral.sampling.max_tokens) == (1.0, 1.0, 0, 48)


def test_a_versions_default_max_tokens_is_cut_to_the_room_left_never_refused():
    assert resolve_max_tokens(None, num_prompt_tokens=95, max_model_len=100, prompt_param="prompt", default=512) == 5
    assert resolve_max_tokens(None, num_prompt_tokens=10, max_model_len=100, prompt_param="prompt", default=8) == 8


def test_cached_tokens_count_each_prompts_once_from_its_first_choice():
    """Two prompts, n=2 (prompt-major): choices 0 and 2 speak for their prompts; choice 1
    found its prompt in the cache only because choice 0 had just put it there."""
    cached = CachedTokens(choices_per_prompt=2)
    for index, num_cached in [(0, 32), (1, 48), (2, 0), (3, 16)]:
        cached.count(ChoiceChunk(index, Chunk("a", 1, num_cached_tokens=num_cached)))
        cached.count(ChoiceChunk(index, Chunk("b", 1)))  # later chunks carry none
    assert cached.num_tokens == 32
