"""x-request-id at the ASGI edge: a client's id is kept only when all of it is a sane token."""

import asyncio
import re

import pytest

from server.api.request_id import RequestId


def _id_for(given: bytes) -> str:
    seen = {}

    async def app(scope, receive, send):
        seen["id"] = scope["state"]["request_id"]

    asyncio.run(RequestId(app)({"type": "http", "headers": [(b"x-request-id", given)]}, None, None))
    return seen["id"]


def test_a_sane_client_id_is_kept():
    assert _id_for(b"client-abc.1:2") == "client-abc.1:2"


@pytest.mark.parametrize("given", [b"abc\n", b"abc\r\nx-admin: 1", b"has space", b"", b"x" * 129])
def test_anything_else_gets_a_new_id(given):
    """A trailing newline passed a `^...$` check (`$` matches before it): the id goes into
    log lines and a response header."""
    assert re.fullmatch(r"[0-9a-f]{32}", _id_for(given))
