"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

Handlers raise :class:`ApiError` (or let an exo-lab error escape); the base handler renders the
body through :func:`api_error_from`, so every failure a client sees has the same shape.
"""
from __future__ import annotations

import re
from http import HTTPStatus

import tornado.web

from ..errors import ClusterError, ExoLabError, QueueFull, RequestError


class ApiError(Exception):
    """An HTTP error with an OpenAI error body.

    status: the HTTP status. type: OpenAI's error type ("invalid_request_error",
    "authentication_error", "server_error"...). param: the request field at fault, if any.
    code: a machine-readable reason ("model_not_found", "context_length_exceeded"...).
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s: float | None = None     # sent as Retry-After (429, 503)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unsupported(param: str, allowed: str) -> ApiError:
    """A field exo-lab does not implement: refused by name instead of being silently ignored."""
    return ApiError(400, f"'{param}' is not supported by this server; leave it out or set it to {allowed}",
                    param=param, code="unsupported_parameter")


def model_not_found(model: str, names: tuple[str, ...]) -> ApiError:
    """The 404 for a model name this server does not serve, naming the ones it does."""
    if not names:
        served = "no model is loaded yet"
    else:
        served = "this server answers to " + ", ".join(f"'{name}'" for name in names)
    shown = model if len(model) <= 200 else model[:197] + "..."
    return ApiError(404, f"the model '{shown}' does not exist here; {served} (GET /v1/models lists them)",
                    param="model", code="model_not_found")


def api_error_from(exc: BaseException | None, status: int = 500) -> ApiError:
    """The ApiError a client sees for any exception a handler let escape."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestError):
        return bad_request(str(exc), param=exc.param)
    if isinstance(exc, QueueFull):
        error = ApiError(429, f"the server is busy: {exc}", type="rate_limit_error", code="queue_full")
        error.retry_after_s = exc.retry_after_s
        return error
    if isinstance(exc, ClusterError):
        return ApiError(503, f"the cluster cannot serve this request: {exc}", type="server_error",
                        code="cluster_unavailable")
    if isinstance(exc, ExoLabError):
        return ApiError(500, str(exc), type="server_error", code="internal_error")
    if isinstance(exc, tornado.web.HTTPError):
        return _from_http_error(exc)
    return _from_status(status)


_ADDRESS = re.compile(r"\btcp://\S+?(?=[\s,;)]|$)|\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?\b")


def redact(text: str, private_names) -> str:
    """``text`` without the given host names (case-insensitive) and without network addresses:
    what a client may see of a message written for the operator."""
    for name in sorted(private_names, key=len, reverse=True):
        text = re.sub(re.escape(name), "<host>", text, flags=re.IGNORECASE)
    return _ADDRESS.sub("<address>", text)


def _from_http_error(exc: tornado.web.HTTPError) -> ApiError:
    if exc.status_code == 405:
        return ApiError(405, f"method not allowed: {exc.log_message or 'this route does not accept it'}",
                        code="method_not_allowed")
    error = _from_status(exc.status_code)
    if exc.log_message and exc.status_code < 500:
        error.message = exc.log_message % exc.args if exc.args else exc.log_message
    return error


def _from_status(status: int) -> ApiError:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "error"
    if status >= 500:
        return ApiError(status, "the server hit an unexpected error; it is logged on the server, and the "
                        "server keeps serving", type="server_error", code="internal_error")
    return ApiError(status, phrase, code=phrase.lower().replace(" ", "_"))
