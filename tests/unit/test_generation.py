from __future__ import annotations

import pytest

from models.errors import ContextLengthExceededError
from server.api.generation import build_requests, resolve_max_tokens
from server.api.schemas import CompletionRequest


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
