"""A batch's input read as requests (pure): what is refused, line by line; what a resumed
batch has answered already; who its requests are made as."""

import json

from server.auth.keys import key
from server.batches.in_process import Caller, caller_of
from server.batches.lines import MAX_ERRORS, answered_ids, output_line, read_lines

URL = "/v1/chat/completions"


def _line(custom_id, url=URL, method="POST", body=None) -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": {"model": "m"} if body is None else body})


def test_good_lines_are_requests_and_blank_lines_are_skipped():
    requests, errors = read_lines([_line("a"), "", "  ", _line("b", body={"model": "m", "stream": False})], URL)
    assert errors == [] and [r.custom_id for r in requests] == ["a", "b"]


def test_each_bad_line_is_named_and_none_runs():
    lines = ["{", "[1]", json.dumps({"method": "POST"}), _line("a"), _line("a"), _line("b", method="GET"), _line("c", url="/v1/embeddings"), _line("d", body=[]), _line("e", body={"stream": True})]
    requests, errors = read_lines(lines, URL)
    assert requests == []
    assert [(e.line, e.code) for e in errors] == [
        (1, "invalid_json_line"), (2, "invalid_request"), (3, "missing_required_parameter"), (5, "duplicate_custom_id"),
        (6, "invalid_method"), (7, "mismatched_url"), (8, "invalid_request"), (9, "invalid_request"),
    ]  # fmt: skip


def test_an_empty_file_is_refused_and_errors_stop_at_the_cap():
    assert [e.code for e in read_lines([], URL)[1]] == ["empty_file"]
    assert len(read_lines(["x"] * 50, URL)[1]) == MAX_ERRORS


def test_a_resumed_batch_skips_what_its_files_answer_and_a_line_cut_off_is_no_answer():
    written = output_line("a", 200, {"ok": True}, "req-1") + output_line("b", 400, {}, "req-2")
    assert answered_ids([*written.splitlines(), '{"custom_id": "c", "resp']) == {"a", "b"}


def test_a_batch_runs_as_its_creators_key_while_it_may_and_as_nobody_after():
    app, ops = key("app", "s1", {"inference"}), key("ops", "s2", {"admin"})
    assert caller_of([app, ops], "app") == Caller(app)
    assert caller_of([ops], "") == Caller(None)  # inference is open: no key is needed
    assert caller_of([app, ops], "ops") is None and caller_of([app], "gone") is None
