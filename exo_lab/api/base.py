"""The base handlers: API key, JSON bodies with a size limit, OpenAI error rendering, logging.

POST bodies must be ``Content-Type: application/json`` (415 otherwise): a web page can make a
browser POST a form or text/plain to a local server without asking it first (CSRF), but not
JSON. Error bodies name the cause without the cluster's host names or addresses
(:func:`~exo_lab.api.errors.redact`); the server log keeps the details.
"""
from __future__ import annotations

import hmac
import json
import logging

import tornado.web

from ..errors import ClusterError, QueueFull, RequestError
from .errors import ApiError, api_error_from, bad_request, redact
from .params import check_json_nesting, may_hold_surrogates

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20          # 1 MiB: far above any chat a context window can hold
# Larger bodies (up to this) are read and dropped so the client gets its 413 before the connection
# closes; closing a socket with unread input resets it and the client may never see the answer.
DRAIN_BODY_BYTES = 64 << 20


class ApiHandler(tornado.web.RequestHandler):
    """JSON responses, optional Bearer key, every failure as an OpenAI error body."""

    requires_key = True

    def initialize(self, server) -> None:
        self.server = server            # the ApiServer: cluster, api_key, counters
        self.cluster = server.cluster

    def prepare(self) -> None:
        if self.requires_key:
            self.check_api_key()

    def check_api_key(self) -> None:
        expected = self.server.api_key
        if expected is None:
            return
        scheme, _, given = self.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")
        if not hmac.compare_digest(given.strip().encode(), expected.encode()):
            raise ApiError(401, "incorrect API key: check the key this server was started with",
                           type="authentication_error", code="invalid_api_key")

    def write_json(self, payload: dict, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(dumps(payload))

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        error = self.client_error(exc, status_code)
        self.set_status(error.status)
        if error.status == 401:
            self.set_header("WWW-Authenticate", "Bearer")
        if error.retry_after_s is not None:
            self.set_header("Retry-After", str(max(1, round(error.retry_after_s))))
        self.set_header("Content-Type", "application/json")
        self.finish(dumps(error.body()))

    def client_error(self, exc: BaseException | None, status: int = 500) -> ApiError:
        """The error a client sees for ``exc``: its OpenAI shape, host names and addresses removed."""
        error = api_error_from(exc, status)
        error.message = redact(error.message, self.server.private_names())
        return error

    def log_exception(self, typ, value, tb) -> None:
        # A client's mistake (or its own limit reached) is one info line; a broken cluster a warning;
        # anything else a traceback.
        where = f"{self.request.method} {self.request.path}"
        if isinstance(value, (ApiError, RequestError, QueueFull, tornado.web.HTTPError)):
            logger.info("%s refused: %s", where, value)
        elif isinstance(value, ClusterError):
            logger.warning("%s failed: %s", where, value)
        else:
            logger.error("%s failed with an unexpected error", where, exc_info=(typ, value, tb))

    def on_finish(self) -> None:
        self.server.count_response(self.get_status())


class NotFoundHandler(ApiHandler):
    """Every route that does not exist: a 404 in OpenAI's shape, whatever the method."""

    requires_key = False

    def prepare(self) -> None:
        raise ApiError(404, f"no route {self.request.method} {self.request.path}; this server has "
                       "/v1/models, /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses, /health "
                       "and /metrics",
                       code="unknown_url")


@tornado.web.stream_request_body
class JsonBodyHandler(ApiHandler):
    """POST handlers: the body is collected here (at most MAX_BODY_BYTES) and parsed as a JSON object.

    The key is checked once the body is in (in :meth:`post`), for the reason given at
    DRAIN_BODY_BYTES; subclasses implement ``handle(body)``.
    """

    def prepare(self) -> None:
        self._body = bytearray()
        self._body_bytes = 0
        declared = self.request.headers.get("Content-Length", "")
        declared_bytes = int(declared) if declared.isdigit() else 0
        # The server's own limit (MAX_BODY_BYTES) would cut the connection with a bare 400.
        self.request.connection.set_max_body_size(max(DRAIN_BODY_BYTES, declared_bytes))
        if declared_bytes > DRAIN_BODY_BYTES:
            # Too large even to drain: answer now and let tornado close the connection.
            raise body_too_large(declared_bytes)

    def data_received(self, chunk: bytes) -> None:
        self._body_bytes += len(chunk)
        if self._body_bytes <= MAX_BODY_BYTES:
            self._body += chunk

    async def post(self) -> None:
        self.check_api_key()
        check_json_content_type(self.request.headers.get("Content-Type"))
        await self.handle(self.json_body())

    async def handle(self, body: dict) -> None:
        raise NotImplementedError

    def json_body(self) -> dict:
        if self._body_bytes > MAX_BODY_BYTES:
            raise body_too_large(self._body_bytes)
        raw = bytes(self._body)
        check_json_nesting(raw)     # [[[[...]]]] 983 deep parsed, then failed deeper in: a 500
        try:
            body = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object", code="invalid_json")
        try:
            if may_hold_surrogates(raw):
                dumps(body)     # one C-speed pass: every string (keys too) must be encodable
        except UnicodeEncodeError:
            raise bad_request("the request body holds a lone surrogate escape such as \"\\ud800\" in a "
                              "string: that is not Unicode text; send UTF-8 text",
                              code="invalid_json") from None
        return body


def check_json_content_type(value: str | None) -> None:
    """Refuse a body that is not declared JSON (415): see the module docstring (CSRF)."""
    media_type = (value or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, f"the request body must be sent with 'Content-Type: application/json', got "
                       f"{(value or 'none')[:80]!r}", code="unsupported_media_type")


def body_too_large(size_bytes: int) -> ApiError:
    return ApiError(413, f"the request body is {size_bytes} bytes; this server takes at most "
                    f"{MAX_BODY_BYTES} bytes ({MAX_BODY_BYTES >> 20} MiB)", code="request_too_large")


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def dumps(payload) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
