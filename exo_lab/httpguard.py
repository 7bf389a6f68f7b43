"""The one HTTP server class of exo-lab (the API and pages, the join and model-file service):
tornado's HTTPServer with what it refuses before any handler runs.

- **Connection cap** (``max_connections``). At the cap, a new connection whose request has not
  arrived whole waits unserved in a small lobby (``LOBBY_SIZE``, ``LOBBY_MIN_S``-``LOBBY_S``)
  and is closed if it stays so: an idle or half-sent flood costs a peek and a close per
  connection. One whose request is whole takes the place of the connection that has waited
  longest on its client (as nginx reuses idle ones), never one whose request has arrived, nor a
  new one younger than ``EVICTABLE_AFTER_S`` (a real client's request may still be on its way a
  moment after it connected; a slowloris connection is old by nature); failing
  that it may pass the cap by an eighth, else it gets a 503 with Retry-After. So a flood of idle
  or half-sent connections neither takes the descriptors nor locks real clients out.
- **Per client** (``per_client``): a client past its share of connections gets a 429.
- **Timeouts**: the request line and headers must arrive within ``header_timeout_s`` of the
  connection's start (a deadline, not per byte: slowloris gains nothing), which is also the idle
  time allowed between keep-alive requests; a body within ``body_timeout_s``.
- **Listen backlog** (``LISTEN_BACKLOG``): long, so a flood delays a real client's connection
  by milliseconds instead of a dropped SYN's second. Bind with :func:`bind_sockets`.
- **Accept errors**: out of descriptors (EMFILE, ENFILE) or memory, the listening socket pauses
  for ``ACCEPT_PAUSE_S`` instead of spinning; waiting clients stay in the kernel's backlog.
- **Host allow-list** (DNS rebinding, as Jupyter guards against it): a server bound to a
  loopback address answers only requests whose ``Host`` is ``localhost``, ``127.0.0.1`` or
  ``[::1]`` (any port) or one of ``allowed_hosts``; anything else is a 403. A page on another
  site that re-points its own name at 127.0.0.1 therefore cannot read this server. A server bound
  to another address checks Host only when ``allowed_hosts`` is given.
- **Logging**: refusals, evictions and accept errors are logged through
  :class:`exo_lab.limits.RepeatFilter` (a few, then counts), and so are tornado's and asyncio's
  per-connection loggers.

The checks run for every route, the ones other modules add to the app included.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import time
from dataclasses import dataclass

import tornado.httpserver
import tornado.ioloop
import tornado.netutil
from tornado import httputil

from .limits import PER_CONNECTION_LOGGERS, REPEATS, LogOnce, bound_loggers

logger = logging.getLogger(__name__)
logger.addFilter(REPEATS)
flood_log = LogOnce(logger)    # events a flood repeats thousands of times a second

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ACCEPT_PAUSE_S = 0.1        # out of descriptors: try accepting again after this long
ACCEPTS_PER_CALL = 128      # connections taken per wake-up, so accepting never starves requests
CLOSING_AT_ONCE = 64        # refused connections kept open a moment so their 503 is read
# The kernel queues connections until they are accepted; past the queue it drops new SYNs and
# a client waits a whole second to retry. A queue longer than tornado's 128 lets real clients
# wait their turn behind a flood (in milliseconds) instead (Linux caps it at somaxconn).
LISTEN_BACKLOG = 4096
PEEK_BYTES = 64 << 10       # what a new connection's request is judged by, at the cap
LOBBY_SIZE = 128            # connections held at the cap until their request is in (descriptors)
LOBBY_S = 0.1               # ... for at most this long
LOBBY_MIN_S = 0.02          # ... and at least this long, before being closed
# A connection never served may be closed for a whole request only once this old: with 9 real
# clients connecting at once on 2 busy cores, one whose request had not reached the kernel yet
# was closed (tests/test_bounded.py, about 1 run in 20 under load).
EVICTABLE_AFTER_S = 0.25
OVERFLOW_FRACTION = 8       # whole requests let in past the cap when none can be closed: cap / 8
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d{1,12})[ \t]*\r\n")   # lower case


@dataclass(frozen=True)
class HttpLimits:
    """One HTTP server's limits."""

    max_connections: int = 256
    allowed_hosts: tuple[str, ...] = ()   # extra Host names to answer to
    header_timeout_s: float = 10.0        # also the keep-alive idle time
    body_timeout_s: float = 30.0
    max_header_bytes: int = 64 << 10
    max_buffer_bytes: int = 4 << 20       # a streamed body is read in chunks far below this


def bind_sockets(port: int, host: str | None) -> list[socket.socket]:
    """Listening sockets for ``host:port`` (None or "": every interface) with the long backlog;
    pass them to :meth:`GuardedHTTPServer.add_sockets`. OSError when the port is taken."""
    return tornado.netutil.bind_sockets(port, address=host or None, backlog=LISTEN_BACKLOG)


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
    """tornado's HTTPServer with a connection cap, timeouts, paused accepts and a Host check.

    ``limits``: :class:`HttpLimits`. ``host_check``: None answers every Host. ``name``: what log
    lines call this server (``"the API"``). ``count_response(status)`` is called for each
    refusal, so /metrics shows them. ``per_client``: counts each client's open connections
    (``open(address) -> bool``, ``close(address)``, ``refusal(address) -> str``; one refused
    gets a 429 with that text), e.g. :class:`exo_lab.api.tenants.ConnectionCounter`; None: no
    such cap. Other keyword arguments go to tornado's HTTPServer."""

    def initialize(self, request_callback, *, limits: HttpLimits, host_check: HostCheck | None = None,
                   count_response=None, name: str = "this server", per_client=None, **kwargs) -> None:
        super().initialize(request_callback, idle_connection_timeout=limits.header_timeout_s,
                           body_timeout=limits.body_timeout_s, max_header_size=limits.max_header_bytes,
                           max_buffer_size=limits.max_buffer_bytes, **kwargs)
        self.limits = limits
        self.host_check = host_check or HostCheck("0.0.0.0")
        self.count_response = count_response or (lambda status: None)
        self.name = name
        self.per_client = per_client
        self._peers: dict = {}        # stream -> address, of connections per_client counts
        self.refused_connections = 0
        self.evicted_connections = 0
        self.accept_errors = 0
        self._waiting = _Waiting()
        self._peek = bytearray(PEEK_BYTES)
        self._lobby = _Lobby(LOBBY_SIZE, self._peek, self._leave_lobby)
        self._evicted: set = set()    # closed by us, not yet gone from _connections
        # tornado adds a connection here at accept; its first request starts a loop turn later,
        # so it waits (and may be evicted) from the moment it is added
        self._connections = _ConnectionSet(self._waiting)
        self._closing = 0
        bound_loggers(PER_CONNECTION_LOGGERS)

    # ------------------------------------------------------------------ accepting
    def add_sockets(self, sockets) -> None:
        for sock in sockets:
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = _Acceptor(sock, self).remove

    def accept_failed(self, error: OSError) -> None:
        self.accept_errors += 1
        flood_log.warning("%s cannot accept connections (%s); pausing %.1f s: raise the open-file limit "
                       "(ulimit -n) if this lasts", self.name, error.strerror or error, ACCEPT_PAUSE_S)

    def accepted(self, connection: socket.socket, address) -> float:
        """A new connection: served, or at the cap held in the :class:`_Lobby` until its
        request has arrived whole, before any work is spent on it. Returns how long to stop
        accepting (0: go on)."""
        if self._has_room() or _request_arrived(connection, self._peek):
            self._handle_connection(connection, address)
            return 0.0
        return self._lobby.hold(connection, address)

    def _leave_lobby(self, connection: socket.socket, address) -> None:
        """Serve a connection from the lobby whose request has come whole (or, the flood over,
        any); close the others."""
        if self._has_room() or _request_arrived(connection, self._peek):
            self._handle_connection(connection, address)
            return
        self.refused_connections += 1
        flood_log.warning("%s holds its maximum of %d connections: closed new ones whose request did "
                          "not arrive whole within %.1f s", self.name, self.limits.max_connections, LOBBY_S)
        connection.close()

    def _has_room(self) -> bool:
        return self._open() < self.limits.max_connections

    def _open(self) -> int:
        return len(self._connections) - len(self._evicted)

    def handle_stream(self, stream, address) -> None:
        if self.per_client is not None and not self.per_client.open(address):
            self._refuse(stream, 429, self.per_client.refusal(address), "too many connections from one client")
            return
        # here only with room, or with a whole request: that one may pass the cap a little
        # rather than be refused while every other connection is busy for a moment
        overflow = self.limits.max_connections // OVERFLOW_FRACTION
        if self._has_room() or self._evict_oldest() or self._open() < self.limits.max_connections + overflow:
            self._peers[stream] = address
            super().handle_stream(stream, address)
            return
        if self.per_client is not None:
            self.per_client.close(address)
        self._refuse(stream, 503, f"this server holds its maximum of {self.limits.max_connections} open "
                                  "connections; retry shortly", "all connections busy")

    def _evict_oldest(self) -> bool:
        """Close the connection that has waited longest for its request (:class:`_Waiting`
        says which); False when none may go."""
        connection = self._waiting.pick()
        if connection is None:
            return False
        self._evicted.add(connection)
        self.evicted_connections += 1
        flood_log.warning("%s holds its maximum of %d connections: closed the one that waited longest "
                       "without sending a whole request", self.name, self.limits.max_connections)
        connection.stream.close()
        return True

    def _refuse(self, stream, status: int, message: str, why: str) -> None:
        """Answer a new connection ``status`` (429: its client's cap, 503: the server's) with
        Retry-After, and close it."""
        self.refused_connections += 1
        flood_log.warning("%s refused connections with %d: %s", self.name, status, why)
        self.count_response(status)
        kind = "rate_limit_error" if status == 429 else "server_error"
        body = error_bytes(message, "too_many_connections", type=kind)
        reason = httputil.responses.get(status, "Unavailable").encode()
        head = (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n" % (status, reason, len(body)))
        try:
            stream.write(head + body).add_done_callback(lambda _: self._close_soon(stream))
        except Exception:  # the peer is gone already
            stream.close()

    def _close_soon(self, stream) -> None:
        # Closing at once, with the client's request unread, would make the kernel reset the
        # connection, and the client might never read its 503. So stop sending, and close a
        # moment later; past a few dozen such connections, at once (the cap bounds descriptors).
        if self._closing >= CLOSING_AT_ONCE or stream.closed():
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

    # ------------------------------------------------------------------ requests
    def start_request(self, server_conn, request_conn) -> httputil.HTTPMessageDelegate:
        self._waiting.request_started(server_conn)
        return _RequestGuard(super().start_request(server_conn, request_conn), request_conn, server_conn, self)

    def stop(self) -> None:
        super().stop()
        self._lobby.close()

    def on_close(self, server_conn) -> None:
        address = self._peers.pop(server_conn.stream, None)
        if address is not None and self.per_client is not None:
            self.per_client.close(address)
        self._waiting.forget(server_conn)
        self._evicted.discard(server_conn)
        super().on_close(server_conn)


class _Lobby:
    """Connections accepted at the cap before their request had arrived whole, held unserved
    (a descriptor each, no other work) for up to LOBBY_S: one whose request arrives whole is let
    in at once; the rest are closed when their time is up. At most ``size`` at a time: a newcomer
    to a full lobby makes the oldest leave early once it has had LOBBY_MIN_S; before that, the
    server stops accepting for the rest of it. So a real client always gets that long for its
    request to arrive, and a flood costs at most ``size / LOBBY_MIN_S`` cheap closes a second;
    connections past that wait in the kernel's queue, where real clients' requests arrive in
    the meantime. ``leave(connection, address)`` is called for each that leaves (it serves or
    closes it)."""

    def __init__(self, size: int, peek: bytearray, leave):
        self.size, self.peek, self.leave = size, peek, leave
        self.members: dict = {}      # connection -> (deadline, address), oldest first
        self.timer = None

    @property
    def loop(self) -> tornado.ioloop.IOLoop:
        return tornado.ioloop.IOLoop.current()

    def hold(self, connection: socket.socket, address) -> float:
        """Hold a new connection; returns how long to stop accepting (0: go on)."""
        self.members[connection] = (self.loop.time() + LOBBY_S, address)
        self.loop.add_handler(connection, self._readable, tornado.ioloop.IOLoop.READ)
        if self.timer is None:
            self.timer = self.loop.call_later(LOBBY_S, self._sweep)
        while len(self.members) > self.size:
            oldest, (deadline, _) = next(iter(self.members.items()))
            wait_s = deadline - LOBBY_S + LOBBY_MIN_S - self.loop.time()
            if wait_s > 0:
                return wait_s
            self.leave(oldest, self._release(oldest))
        return 0.0

    def _release(self, connection: socket.socket):
        _, address = self.members.pop(connection)
        self.loop.remove_handler(connection)
        return address

    def _readable(self, connection: socket.socket, events) -> None:
        if _request_arrived(connection, self.peek) or not _has_bytes(connection):   # or it closed
            self.leave(connection, self._release(connection))
        else:
            self.loop.remove_handler(connection)   # a part: its time decides (no busy loop)

    def _sweep(self) -> None:
        self.timer = None
        now = self.loop.time()
        while self.members and next(iter(self.members.values()))[0] <= now:
            connection = next(iter(self.members))
            self.leave(connection, self._release(connection))
        if self.members:
            self.timer = self.loop.call_at(next(iter(self.members.values()))[0], self._sweep)

    def close(self) -> None:
        if self.timer is not None:
            self.loop.remove_timeout(self.timer)
            self.timer = None
        for connection in list(self.members):
            self._release(connection)
            connection.close()


class _Waiting:
    """The open connections that have not sent a whole request, least recently active first:
    those never served, then kept-alive ones between requests. One may be closed to make room
    only while the server waits on its client (a read pending, nothing unread in the kernel): a
    real client's request that has arrived is never cut, however busy the loop."""

    def __init__(self):
        self.new: dict = {}      # connection -> [whether its request loop has started, when accepted]
        self.kept: dict = {}     # connection -> [True, 0.0]

    def accepted(self, connection) -> None:
        self.new[connection] = [False, time.monotonic()]

    def request_started(self, connection) -> None:
        if connection in self.new:
            self.new[connection][0] = True
        else:
            self.kept[connection] = [True, 0.0]

    def touch(self, connection) -> None:
        """Bytes of its request arrived: it goes to the back."""
        for waiting in (self.new, self.kept):
            if connection in waiting:
                waiting[connection] = waiting.pop(connection)

    def forget(self, connection) -> None:
        self.new.pop(connection, None)
        self.kept.pop(connection, None)

    def pick(self):
        """The connection to close, taken out of this list; None when none may go (a new one
        only once EVICTABLE_AFTER_S old)."""
        young = time.monotonic() - EVICTABLE_AFTER_S
        for waiting in (self.new, self.kept):
            for connection, (started, since) in waiting.items():
                if since <= young and _waits_on_client(connection.stream, started):
                    del waiting[connection]
                    return connection
        return None


def _waits_on_client(stream, started: bool) -> bool:
    """Whether the server waits on the peer: a read pending (or, on a connection accepted in
    this loop turn whose request loop has not started yet, nothing read at all), and no bytes in
    the kernel that the loop has not read yet."""
    return ((stream.reading() or not started) and stream.socket is not None
            and not _has_bytes(stream.socket))


def _request_arrived(sock: socket.socket, buffer: bytearray) -> bool:
    """Whether the bytes waiting on a new connection hold a whole request (its headers, and the
    body its Content-Length gives), or more than one peek into ``buffer`` can tell, or a body
    it cannot judge (chunked, Expect: 100-continue): those are let in."""
    try:
        size = sock.recv_into(buffer, len(buffer), socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:      # BlockingIOError: nothing yet
        return False
    end = buffer.find(b"\r\n\r\n", 0, size)
    if size >= len(buffer) or end < 0:
        return size >= len(buffer)
    headers = bytes(buffer[:end + 2]).lower()
    length = _CONTENT_LENGTH.search(headers)
    body_bytes = int(length.group(1)) if length else 0
    return (size - end - 4 >= body_bytes or b"chunked" in headers
            or b"100-continue" in headers)   # the body comes once the server says so


def _has_bytes(sock: socket.socket) -> bool:
    """Whether bytes from the peer wait unread in the kernel (not when it closed or broke)."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:      # BlockingIOError: nothing yet
        return False


class _ConnectionSet(set):
    """tornado's set of open connections, that also enters each new one in :class:`_Waiting`."""

    def __init__(self, waiting: _Waiting):
        super().__init__()
        self.waiting = waiting

    def add(self, connection) -> None:
        super().add(connection)
        self.waiting.accepted(connection)


class _Acceptor:
    """Accepts connections on one listening socket for ``server``, as tornado's accept handler
    does, but pauses on an accept error (out of descriptors) instead of raising on every
    wake-up, and for as long as :meth:`GuardedHTTPServer.accepted` says (a full lobby)."""

    def __init__(self, sock: socket.socket, server: GuardedHTTPServer):
        self.sock, self.server = sock, server
        self.loop = tornado.ioloop.IOLoop.current()
        self.removed = False
        self.pause = None
        self.loop.add_handler(sock, self._ready, tornado.ioloop.IOLoop.READ)

    def _ready(self, fd, events) -> None:
        for _ in range(ACCEPTS_PER_CALL):
            if self.removed:
                return
            try:
                connection, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:       # EMFILE, ENFILE, ENOBUFS, ENOMEM
                self.server.accept_failed(exc)
                self._pause(ACCEPT_PAUSE_S)
                return
            wait_s = self.server.accepted(connection, address)
            if wait_s:
                self._pause(wait_s)
                return

    def _pause(self, seconds: float) -> None:
        self.loop.remove_handler(self.sock)
        self.pause = self.loop.call_later(seconds, self._resume)

    def _resume(self) -> None:
        self.pause = None
        if not self.removed:
            self.loop.add_handler(self.sock, self._ready, tornado.ioloop.IOLoop.READ)

    def remove(self) -> None:
        self.removed = True
        if self.pause is not None:
            self.loop.remove_timeout(self.pause)
        else:
            self.loop.remove_handler(self.sock)


class _RequestGuard(httputil.HTTPMessageDelegate):
    """Passes a request on to the app, unless its Host is refused: then a 403, and nothing of
    the request reaches a handler. Tells the server when the whole request is in."""

    def __init__(self, inner: httputil.HTTPMessageDelegate, connection, server_conn,
                 server: GuardedHTTPServer):
        self.inner = inner
        self.connection = connection
        self.server_conn = server_conn
        self.server = server
        self.refused = False

    def headers_received(self, start_line, headers):
        self.server._waiting.touch(self.server_conn)
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
        self.server._waiting.touch(self.server_conn)
        return None if self.refused else self.inner.data_received(chunk)

    def finish(self) -> None:
        self.server._waiting.forget(self.server_conn)      # being answered now
        if not self.refused:
            self.inner.finish()

    def on_connection_close(self) -> None:
        if not self.refused:
            self.inner.on_connection_close()
