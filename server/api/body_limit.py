"""ASGI middleware that refuses request bodies over a size limit with 413."""

from __future__ import annotations

import json

from models.errors import PayloadTooLargeError
from server.api.error_bodies import error_body


class BodySizeLimit:
    """Checks Content-Length up front and counts streamed (chunked) bodies as they arrive,
    so an oversized body is refused before it is held in memory."""

    def __init__(self, app, max_bytes: int, max_bytes_by_path: dict[str, int] | None = None):
        """`max_bytes_by_path`: other limits for some paths (file uploads)."""
        self._app = app
        self._max_bytes = max_bytes
        self._max_bytes_by_path = max_bytes_by_path or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self._app(scope, receive, send)
        max_bytes = self._max_bytes_by_path.get(scope["path"], self._max_bytes)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            return await self._refuse(scope["path"], send, max_bytes)
        num_received = 0

        async def counted_receive():
            nonlocal num_received
            message = await receive()
            num_received += len(message.get("body", b""))
            if num_received > max_bytes:
                raise _error(max_bytes)
            return message

        await self._app(scope, counted_receive, send)

    async def _refuse(self, path: str, send, max_bytes: int) -> None:
        error = _error(max_bytes)
        body = json.dumps(error_body(path, error, error.status_code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _error(max_bytes: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"The request body is larger than the limit of {max_bytes} bytes.")
