"""Errors as each API writes them: Anthropic's shape on its Messages routes, OpenAI's
everywhere else. The exception tree (models/errors.py) is mapped to these bodies once, at the
edge (app.py, and the body-size limit that answers before any route)."""

from __future__ import annotations

from models.errors import BatonError

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def error_body(path: str, error: BatonError, status_code: int) -> dict:
    """An error's JSON as the route at `path` writes it."""
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return {"type": "error", "error": anthropic_error(error, status_code)}
    return error.to_body()


def anthropic_error(error: BatonError, status_code: int) -> dict:
    """Anthropic's error object (also a stream's `error` event)."""
    return {"type": ERROR_TYPES.get(status_code, "api_error" if status_code >= 500 else "invalid_request_error"), "message": error.message}
