"""Which requests a canary's mirror copies, what a copy sends, and the shares a canary may
take: pure rules (mirrors.py, health.py)."""

from __future__ import annotations

import pytest

from models.errors import InvalidRequestError
from server.api.mirrors import MAX_IN_FLIGHT, MIRROR_PRIORITY, copy_decision, copy_of, is_copyable
from server.deployments.health import check_canary_share


@pytest.mark.parametrize(
    ("mirror", "served_by_active", "is_pinned", "num_in_flight", "has_free_place", "draw", "decision"),
    [
        (20, True, False, 0, True, 19.9, "copied"),
        (20, True, False, 0, True, 20.0, None),  # outside the mirrored share
        (100, True, False, 0, True, 99.9, "copied"),
        (20, False, False, 0, True, 1.0, None),  # the canary served it already
        (20, True, True, 0, True, 1.0, None),  # pinned to a version (a copy is, too): never copied
        (20, True, False, MAX_IN_FLIGHT, True, 1.0, "dropped"),
        (20, True, False, 0, False, 1.0, "dropped"),  # a copy would wait for a client's place
        (0, True, False, 0, True, 0.0, None),
    ],
)
def test_a_request_is_copied_when_the_active_version_serves_it_unpinned_within_the_share(mirror, served_by_active, is_pinned, num_in_flight, has_free_place, draw, decision):
    assert copy_decision(mirror, served_by_active, is_pinned, num_in_flight, has_free_place, draw) == decision


def test_a_copy_is_pinned_whole_kept_nowhere_and_last_in_line():
    sent = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True, "stream_options": {"include_usage": True}, "store": True, "priority": -5}
    assert copy_of("/v1/chat/completions", sent, "chat@5") == {"model": "chat@5", "messages": sent["messages"], "stream": False, "store": False, "priority": MIRROR_PRIORITY}
    assert "store" not in copy_of("/v1/completions", {"model": "chat", "prompt": "hi"}, "chat@5")  # a field its route has not, it is not given
    assert sent["model"] == "chat" and sent["stream"]  # the original is left as it was
    response = copy_of("/v1/responses", {"model": "chat", "input": "hi", "background": True, "previous_response_id": "resp_1"}, "chat@5")
    assert (response["store"], response["background"], response["previous_response_id"]) == (False, False, "resp_1")  # unset `store` would keep it
    assert copy_of("/v1/messages", {"model": "chat", "max_tokens": 8, "messages": []}, "chat@5") == {"model": "chat@5", "max_tokens": 8, "messages": [], "stream": False}
    assert copy_of("/v1/embeddings", {"model": "chat", "input": ["hi"], "priority": 3}, "chat@5") == {"model": "chat@5", "input": ["hi"], "priority": MIRROR_PRIORITY}  # no `stream`: the route has none


@pytest.mark.parametrize(
    ("path", "body", "copyable"),
    [
        ("/v1/chat/completions", {}, True),
        ("/v1/messages", {}, True),
        ("/v1/responses", {"previous_response_id": "resp_1"}, True),  # reads what its key kept, writes nothing
        ("/v1/responses", {"conversation": "conv_1"}, False),  # its answer would join the conversation
        ("/v1/embeddings", {}, True),
        ("/v2/rerank", {}, True),
        ("/tokenize", {}, False),  # nothing to judge: it runs no model
    ],
)
def test_only_requests_whose_copy_writes_nothing_a_client_reads_are_copied(path, body, copyable):
    assert is_copyable(path, body) is copyable


@pytest.mark.parametrize(("weight", "mirror"), [(10, 0), (0, 20), (99, 100), (30, 50)])
def test_a_canary_serves_a_share_gets_copies_or_both(weight, mirror):
    check_canary_share(weight, mirror)


@pytest.mark.parametrize(("weight", "mirror", "param"), [(0, 0, "weight"), (100, 0, "weight"), (-1, 10, "weight"), (10, 101, "mirror")])
def test_a_canary_that_would_serve_nothing_or_everything_is_refused(weight, mirror, param):
    with pytest.raises(InvalidRequestError) as refused:
        check_canary_share(weight, mirror)
    assert refused.value.param == param
