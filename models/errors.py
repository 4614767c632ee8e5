"""The one exception tree of baton.

The core raises these; `server.app` maps them once, at the edge, to OpenAI-shaped JSON:
`{"error": {"message", "type", "param", "code"}}` with the class's HTTP status.
"""

from __future__ import annotations


class BatonError(Exception):
    status_code = 500
    error_type = "server_error"
    default_code: str | None = None
    retry_after_s: int | None = None  # sent as Retry-After: when trying again makes sense

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code

    def to_body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(BatonError):
    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthExceededError(InvalidRequestError):
    default_code = "context_length_exceeded"


class UnsupportedParameterError(InvalidRequestError):
    default_code = "unsupported_parameter"


class AuthenticationError(BatonError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class NotFoundError(BatonError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFoundError(NotFoundError):
    default_code = "model_not_found"


class MethodNotAllowedError(BatonError):
    status_code = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class PayloadTooLargeError(BatonError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"


class RateLimitedError(BatonError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: int, param: str | None = None, code: str | None = None):
        super().__init__(message, param=param, code=code)
        self.retry_after_s = retry_after_s


class OverloadedError(BatonError):
    status_code = 503
    error_type = "server_error"
    default_code = "overloaded"
    retry_after_s = 5


class EngineError(BatonError):
    """The engine failed while serving a request (not the caller's fault)."""

    status_code = 500
    error_type = "server_error"
    default_code = "engine_error"


class EngineStoppedError(EngineError):
    status_code = 503
    default_code = "engine_stopped"


class ConfigError(BatonError):
    """Bad operator configuration: raised at start-up, reported by the CLI."""

    default_code = "invalid_config"


class ModelLoadError(InvalidRequestError):
    """Weights that cannot be loaded or imported as asked (no weights, pickle without permission...)."""

    default_code = "model_load_failed"


class ConflictError(BatonError):
    """The request is valid but the current state forbids it (an aliased version, a swap in progress)."""

    status_code = 409
    error_type = "invalid_request_error"
    default_code = "conflict"


class CorruptVersionError(ConflictError):
    default_code = "version_corrupt"


class ForbiddenError(BatonError):
    status_code = 403
    error_type = "permission_error"
    default_code = "forbidden"


class ModelSwappedError(BatonError):
    """A request was still running on a version when its drain deadline passed."""

    status_code = 503
    error_type = "server_error"
    default_code = "model_swapped"


class ClientDisconnectedError(BatonError):
    """The client went away; nobody reads this answer (nginx's 499)."""

    status_code = 499
    error_type = "invalid_request_error"
    default_code = "client_disconnected"


class SwapFailedError(BatonError):
    """Loading or verifying the new version failed; the old version keeps serving."""

    status_code = 500
    error_type = "server_error"
    default_code = "swap_failed"
