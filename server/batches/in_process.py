"""Requests served by the app itself in this process, through its whole stack (routing,
admission queue, limits, the engines), as a key: a batch's (as the key that created the
batch) and a canary's mirrored copies (as the original's key, mirrors.py).

Rule: the caller travels in the ASGI scope (ON_BEHALF_OF), where no HTTP client can put
anything; `admit` takes it instead of a token. The key was checked when the batch was made.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from server.auth.keys import KeySpec, is_open

ON_BEHALF_OF = "baton.on_behalf_of"


@dataclass(frozen=True)
class Caller:
    key: KeySpec | None  # None: a server without keys


class InProcess:
    def __init__(self, app, state: dict):
        """`state`: the app's lifespan state, as a request made over HTTP gets it."""
        self._app, self._state = app, state

    async def post(self, path: str, body: dict, caller: Caller) -> tuple[int, dict, str]:
        """(status code, JSON body, request id) of POST `path` with `body`."""
        payload = json.dumps(body).encode()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
            "client": None,
            "server": None,
            "state": dict(self._state),
            ON_BEHALF_OF: caller,
        }
        pending = [{"type": "http.request", "body": payload, "more_body": False}]
        never = asyncio.get_running_loop().create_future()  # the caller never goes away

        async def receive() -> dict:
            return pending.pop() if pending else await never

        answer: dict = {"status": 500, "headers": [], "body": b""}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                answer["status"], answer["headers"] = message["status"], message.get("headers", [])
            elif message["type"] == "http.response.body":
                answer["body"] += message.get("body", b"")

        await self._app(scope, receive, send)
        request_id = dict(answer["headers"]).get(b"x-request-id", b"").decode()
        return answer["status"], json.loads(answer["body"] or b"null"), request_id


def caller_of(keys: list[KeySpec], owner: str) -> Caller | None:
    """Who a batch created by `owner` makes its requests as, with the server's keys as they
    are now: its key, while it has the inference scope; no key, where that scope is open (as
    `authorize` has it); else None: nobody may."""
    if is_open(keys, "inference"):
        return Caller(None)
    key = next((key for key in keys if key.name == owner and "inference" in key.scopes), None)
    return Caller(key) if key is not None else None
