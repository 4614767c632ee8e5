"""A batch's input file read as requests, and what its output files say about each: pure
functions, no I/O beyond the lines they are given.

Rules (OpenAI's batch input): one JSON object a line, `{"custom_id", "method": "POST", "url",
"body"}`; every url is the batch's endpoint; custom_ids are unique; a streamed body is
refused (a batch answers whole). A file with any bad line fails its batch before anything runs,
with every bad line named (the first MAX_ERRORS of them)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
MAX_LINES = 50_000  # requests in one batch, as OpenAI has it
MAX_ERRORS = 10


@dataclass(frozen=True)
class BatchLine:
    custom_id: str
    body: dict


@dataclass(frozen=True)
class LineError:
    line: int  # 1-based, as editors count
    code: str
    message: str
    param: str | None = None

    def as_openai(self) -> dict:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


def read_lines(text_lines: Iterable[str], endpoint: str) -> tuple[list[BatchLine], list[LineError]]:
    """The requests, or what is wrong with the file (then no requests)."""
    requests, errors, seen = [], [], set()
    for number, text in enumerate(text_lines, start=1):
        if not text.strip():
            continue
        line, error = _read_line(number, text, endpoint, seen)
        if error is not None:
            errors.append(error)
        else:
            requests.append(line)
            seen.add(line.custom_id)
    if len(requests) + len(errors) > MAX_LINES:
        errors.insert(0, LineError(MAX_LINES + 1, "too_many_requests", f"A batch holds at most {MAX_LINES} requests."))
    if not requests and not errors:
        errors.append(LineError(1, "empty_file", "The input file holds no requests."))
    return ([] if errors else requests), errors[:MAX_ERRORS]


def _read_line(number: int, text: str, endpoint: str, seen: set[str]) -> tuple[BatchLine | None, LineError | None]:
    try:
        request = json.loads(text)
    except ValueError:
        return None, LineError(number, "invalid_json_line", "This line is not JSON.")
    if not isinstance(request, dict):
        return None, LineError(number, "invalid_request", "A line is one JSON object.")
    custom_id, body = request.get("custom_id"), request.get("body")
    if not isinstance(custom_id, str) or not custom_id:
        return None, LineError(number, "missing_required_parameter", "Each line needs a custom_id (a string).", "custom_id")
    if custom_id in seen:
        return None, LineError(number, "duplicate_custom_id", f"The custom_id {custom_id!r} is on an earlier line too.", "custom_id")
    if request.get("method") != "POST":
        return None, LineError(number, "invalid_method", "The method must be POST.", "method")
    if request.get("url") != endpoint:
        return None, LineError(number, "mismatched_url", f"Every line's url must be the batch's endpoint, {endpoint}.", "url")
    if not isinstance(body, dict):
        return None, LineError(number, "invalid_request", "Each line needs a body (a JSON object).", "body")
    if body.get("stream"):
        return None, LineError(number, "invalid_request", "A batch answers whole: stream must not be true.", "body.stream")
    return BatchLine(custom_id, body), None


def output_line(custom_id: str, status_code: int, body: dict, request_id: str) -> str:
    """One answered request, as OpenAI's output and error files write it."""
    answer = {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": custom_id, "response": {"status_code": status_code, "request_id": request_id, "body": body}, "error": None}
    return json.dumps(answer, ensure_ascii=False) + "\n"


def answered_ids(text_lines: Iterable[str]) -> set[str]:
    """The custom_ids an output (or error) file answers already: a batch resumed after a
    restart runs only the others. A last line cut off mid-write is not an answer."""
    answered = set()
    for text in text_lines:
        try:
            answered.add(json.loads(text)["custom_id"])
        except (ValueError, KeyError, TypeError):
            continue
    return answered
