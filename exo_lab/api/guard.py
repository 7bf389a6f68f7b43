"""What the HTTP server refuses before any handler runs: too many connections, slow or oversized
headers and bodies, and Host names a loopback server does not answer to.

- **Connection cap** (``max_connections``): past it, a new connection gets a short 503 and is
  closed at once, so a flood of half-sent requests cannot take every file descriptor.
- **Timeouts**: the request line and headers must arrive within ``header_timeout_s`` (also the
  idle time allowed between keep-alive requests), a body within ``body_timeout_s``.
- **Host allow-list** (DNS rebinding, as Jupyter guards against it): a server bound to a
  loopback address answers only requests whose ``Host`` is ``localhost``, ``127.0.0.1`` or
  ``[::1]`` (any port) or one of ``allowed_hosts``; anything else is a 403. A page on another
  site that re-points its own name at 127.0.0.1 therefore cannot read this server. A server bound
  to another address checks Host only when ``allowed_hosts`` is given (its API key is the guard).

The checks run for every route, the ones other modules add to the app included.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import socket
from dataclasses import dataclass

import tornado.httpserver
import tornado.ioloop
from tornado import httputil

logger = logging.getLogger(__name__)

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class ApiLimits:
    """The HTTP server's limits (config.yaml ``api`` keys of the same names where noted)."""

    max_connections: int = 256            # api.max_connections
    allowed_hosts: tuple[str, ...] = ()   # api.allowed_hosts: extra Host names to answer to
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_header_bytes: int = 64 << 10
    max_buffer_bytes: int = 4 << 20       # a streamed body is read in chunks far below this


def limits_from_config(config) -> ApiLimits:
    """The limits a config.yaml's ``api`` section sets (the defaults for the rest)."""
    api = getattr(config, "api", None)
    return ApiLimits(max_connections=getattr(api, "max_connections", ApiLimits.max_connections),
                     allowed_hosts=tuple(getattr(api, "allowed_hosts", ()) or ()))


def is_loopback(host: str) -> bool:
    """Whether a bind address or host name means this machine only."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name part of a Host header: ``[::1]:8000`` -> ``::1``, ``Example.org.:80`` -> ``example.org``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header[1:]
    return header.rsplit(":", 1)[0].rstrip(".") if header.count(":") == 1 else header.rstrip(".")


class HostCheck:
    """Which Host headers a server bound to ``bind_host`` answers (see the module docstring)."""

    def __init__(self, bind_host: str, allowed_hosts: tuple[str, ...] = ()):
        self.extra = {host_name(name) for name in allowed_hosts}
        self.enforced = is_loopback(bind_host or "0.0.0.0") or bool(self.extra)

    def allows(self, header: str | None) -> bool:
        if not self.enforced or header is None:   # HTTP/1.0 without Host: no browser sends that
            return True
        name = host_name(header)
        return name in LOOPBACK_NAMES or name in self.extra or is_loopback(name)


def error_bytes(message: str, code: str, type: str = "invalid_request_error") -> bytes:
    """An OpenAI error body, for answers written before any handler exists."""
    body = {"error": {"message": message, "type": type, "param": None, "code": code}}
    return json.dumps(body, separators=(",", ":")).encode()


class GuardedHTTPServer(tornado.httpserver.HTTPServer):
    """tornado's HTTPServer with a connection cap and a Host check (:class:`ApiLimits`).

    ``count_response(status)`` is called for each refusal, so /metrics shows them."""

    def initialize(self, request_callback, *, limits: ApiLimits, host_check: HostCheck,
                   count_response=None, **kwargs) -> None:
        super().initialize(request_callback, idle_connection_timeout=limits.header_timeout_s,
                           body_timeout=limits.body_timeout_s, max_header_size=limits.max_header_bytes,
                           max_buffer_size=limits.max_buffer_bytes, **kwargs)
        self.limits = limits
        self.host_check = host_check
        self.count_response = count_response or (lambda status: None)
        self.refused_connections = 0
        self._closing = 0

    def handle_stream(self, stream, address) -> None:
        if len(self._connections) < self.limits.max_connections:
            super().handle_stream(stream, address)
            return
        self.refused_connections += 1
        if self.refused_connections in (1, 10, 100) or self.refused_connections % 1000 == 0:
            logger.warning("refused %d connection(s) so far: %d are open (api.max_connections)",
                           self.refused_connections, self.limits.max_connections)
        self.count_response(503)
        body = error_bytes(f"this server holds its maximum of {self.limits.max_connections} open "
                           "connections; retry shortly", "too_many_connections", type="server_error")
        head = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        try:
            stream.write(head + body).add_done_callback(lambda _: self._close_soon(stream))
        except Exception:  # the peer is gone already
            stream.close()

    def _close_soon(self, stream) -> None:
        # Closing at once, with the client's request unread, would make the kernel reset the
        # connection, and the client might never read its 503. So stop sending, and close a
        # moment later; past a few dozen such connections, at once (the cap bounds descriptors).
        if self._closing >= 64 or stream.closed():
            stream.close()
            return
        self._closing += 1
        try:
            stream.socket.shutdown(socket.SHUT_WR)
        except OSError:
            pass

        def close() -> None:
            self._closing -= 1
            stream.close()

        tornado.ioloop.IOLoop.current().call_later(1.0, close)

    def start_request(self, server_conn, request_conn) -> httputil.HTTPMessageDelegate:
        return _HostGuard(super().start_request(server_conn, request_conn), request_conn, self)


class _HostGuard(httputil.HTTPMessageDelegate):
    """Passes a request on to the app, unless its Host is refused: then a 403, and nothing of
    the request reaches a handler."""

    def __init__(self, inner: httputil.HTTPMessageDelegate, connection, server: GuardedHTTPServer):
        self.inner = inner
        self.connection = connection
        self.server = server
        self.refused = False

    def headers_received(self, start_line, headers):
        if self.server.host_check.allows(headers.get("Host")):
            return self.inner.headers_received(start_line, headers)
        self.refused = True
        self.server.count_response(403)
        logger.info("refused a request for Host %r (not this server's name)", headers.get("Host"))
        body = error_bytes("this server does not answer to that Host name; use http://127.0.0.1:PORT "
                           "or http://localhost:PORT, or add the name to api.allowed_hosts",
                           "host_not_allowed")
        self.connection.write_headers(
            httputil.ResponseStartLine("HTTP/1.1", 403, "Forbidden"),
            httputil.HTTPHeaders({"Content-Type": "application/json", "Content-Length": str(len(body)),
                                  "Connection": "close"}), body)
        self.connection.finish()
        return None

    def data_received(self, chunk):
        return None if self.refused else self.inner.data_received(chunk)

    def finish(self) -> None:
        if not self.refused:
            self.inner.finish()

    def on_connection_close(self) -> None:
        if not self.refused:
            self.inner.on_connection_close()
