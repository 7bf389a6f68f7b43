"""Data-plane authentication: CurveZMQ keys derived from the cluster secret, and the ZAP handler
that admits only peers holding it.

Decision: CurveZMQ rather than a MAC per frame. Every connection does a CurveZMQ handshake, so
a peer without the secret can neither send a frame (the inbox's ZAP handler refuses its client
key before any message is delivered) nor read one (every frame is encrypted), and a captured
frame cannot be replayed (each connection has fresh session keys and every message a nonce).
The cost is in libzmq's I/O threads, off the GIL: on loopback it adds about 0.01 ms to a
3.5 KB hop and about 2 ms to a 1 MB prefill hop (``python benchmarks/bench_dataplane.py``),
less than BLAKE2b over the same bytes in Python would.

CURVE alone authenticates only the server (the inbox) to its clients; the ZAP handler makes
it mutual. All holders of one secret share two keypairs: the inboxes' (server) and the
outboxes' (client). Each inbox registers its key's ZAP domain with the handler of its
zmq context (one handler per context, started with the first keyed inbox and stopped with the
last), so clusters with different secrets in one process (tests, notebooks) stay apart.
"""
from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from dataclasses import dataclass

import zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from ..limits import REPEATS, LogOnce

logger = logging.getLogger(__name__)
logger.addFilter(REPEATS)
flood_log = LogOnce(logger)    # events a flood repeats thousands of times a second

KEY_BYTES = 32
MAX_INBOX_CONNECTIONS = 64   # a stage's inbox has one peer (two during a re-plan)


@dataclass(frozen=True)
class CurveKeys:
    """The CurveZMQ keypairs (Z85 text, as libzmq takes them) that one data-plane key gives."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes
    domain: str          # the ZAP domain of inboxes with these keys (a fingerprint, no secret)

    @classmethod
    def from_key(cls, key: bytes) -> "CurveKeys":
        """Keys for ``key`` = ``exo_lab.security.derive_key(secret, "data-plane")``."""
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
            raise ValueError(f"a data-plane key is {KEY_BYTES} bytes (exo_lab.security.derive_key)")
        server_secret = _curve_secret(key, b"curve-server")
        client_secret = _curve_secret(key, b"curve-client")
        client_public = zmq.curve_public(client_secret)
        fingerprint = hashlib.blake2b(client_public, digest_size=8).hexdigest()
        return cls(server_public=zmq.curve_public(server_secret), server_secret=server_secret,
                   client_public=client_public, client_secret=client_secret,
                   domain=f"exo-lab-data-plane-{fingerprint}")


def _curve_secret(key: bytes, person: bytes) -> bytes:
    # any 32 bytes are a Curve25519 secret key (libsodium clamps them)
    return z85.encode(hashlib.blake2b(bytes(key), digest_size=32, person=person).digest())


def make_server(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Configure an unbound inbox socket as a CURVE server checked by ZAP domain ``keys.domain``."""
    sock.zap_domain = keys.domain.encode()
    sock.curve_server = True
    sock.curve_secretkey = keys.server_secret
    sock.curve_publickey = keys.server_public


def make_client(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Configure an unconnected outbox socket as a CURVE client of inboxes with ``keys``."""
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.client_public
    sock.curve_secretkey = keys.client_secret


class HandshakeMonitor:
    """Watches one inbox socket's TCP connections from a thread of its own (libzmq's monitor
    events), for two jobs:

    - counts failed handshakes: a peer without the secret, a plain ZeroMQ socket, garbage, or
      nothing at all within the handshake interval (:attr:`failed`, read without blocking);
    - holds the socket to ``max_connections`` open connections, which libzmq cannot: past it, a
      newly accepted connection is shut down at once (libzmq then closes it), so a flood of idle
      connections cannot take the process's descriptors. Connections already open, the
      pipeline's own among them, are kept. A peer refused so reconnects (ZeroMQ's own retry).
    """

    FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
              | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    EVENTS = FAILED | zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_MONITOR_STOPPED
    POLL_MS = 100
    PRUNE_EVERY_S = 1.0

    def __init__(self, sock: zmq.Socket, max_connections: int = MAX_INBOX_CONNECTIONS):
        """Watch ``sock`` (before it binds: set :attr:`port` once it has)."""
        self.failed = 0
        self.shut_down = 0                          # connections closed for the cap
        self.max_connections = max_connections
        self._open: dict[int, tuple] = {}           # fd -> (local, peer address) of accepted ones
        self.port: int | None = None                # the socket's TCP port, once bound
        self._pruned = 0.0
        self._watched = sock
        address = f"inproc://exo-lab-handshakes-{id(self):x}"
        sock.monitor(address, self.EVENTS)
        self._events = zmq.Context.shadow(sock.context.underlying).socket(zmq.PAIR)
        self._events.linger = 0
        self._events.rcvhwm = 0    # a dropped event would lose track of a connection
        self._events.connect(address)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="exo-lab-inbox-monitor", daemon=True)
        self._thread.start()

    def count(self) -> int:
        """Failed handshakes so far."""
        return self.failed

    def close(self) -> None:
        self._stopping.set()
        try:
            self._watched.disable_monitor()
        except zmq.ZMQError:
            pass   # the socket is closed already
        self._thread.join(5.0)

    def _watch(self) -> None:
        try:
            while not self._stopping.is_set():
                if self._events.poll(self.POLL_MS) and self._handle(self._drain()):
                    return
        finally:
            self._events.close(linger=0)

    def _drain(self) -> list[dict]:
        batch = []
        while True:
            try:
                batch.append(parse_monitor_message(self._events.recv_multipart(zmq.NOBLOCK)))
            except zmq.Again:
                return batch

    def _handle(self, batch: list[dict]) -> bool:
        """Apply a batch of events in order; True once the monitor has stopped."""
        # a connection that came and went within the batch is skipped whole: its fd may be reused
        gone_at = {event["value"]: i for i, event in enumerate(batch) if event["event"] == zmq.EVENT_DISCONNECTED}
        for i, event in enumerate(batch):
            kind, value = event["event"], event["value"]
            if kind & self.FAILED:
                self.failed += 1
            elif kind == zmq.EVENT_ACCEPTED and gone_at.get(value, -1) < i:
                self._accepted(value)
            elif kind == zmq.EVENT_DISCONNECTED:
                self._open.pop(value, None)
            elif kind == zmq.EVENT_MONITOR_STOPPED:
                return True
        return False

    def _accepted(self, fd: int) -> None:
        identity = _identity(fd)
        if identity is None or identity[0][1] != self.port:
            return      # closed already, and the descriptor may hold another socket now
        if len(self._open) >= self.max_connections and time.monotonic() > self._pruned + self.PRUNE_EVERY_S:
            self._prune()
        if len(self._open) < self.max_connections:
            self._open[fd] = identity
            return
        self.shut_down += 1
        _fd_call(fd, lambda sock: _identity_of(sock) == identity and sock.shutdown(socket.SHUT_RDWR))
        flood_log.warning("a data-plane inbox holds its maximum of %d connections: closed a new one at "
                       "once (a flood of connections that never authenticate?)", self.max_connections)

    def _prune(self) -> None:
        """Forget entries whose descriptor holds another connection now (a DISCONNECTED missed:
        none should be, the event queue is unbounded; checked at most every PRUNE_EVERY_S)."""
        self._pruned = time.monotonic()
        self._open = {fd: identity for fd, identity in self._open.items() if _identity(fd) == identity}


def _identity(fd: int) -> tuple | None:
    """(local, peer address) of the connection on ``fd``: checked again before acting on a
    descriptor, since libzmq may have closed it and the number now be another socket's."""
    return _fd_call(fd, _identity_of)


def _identity_of(sock: socket.socket) -> tuple:
    return sock.getsockname(), sock.getpeername()


def _fd_call(fd: int, call):
    """``call(socket)`` on a descriptor libzmq owns, without taking it over (never closes it);
    None when it is no socket now."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        return call(sock)
    except OSError:
        return None
    finally:
        sock.detach()


class _Domain:
    """A ZAP domain and the one client key it admits."""

    def __init__(self, client_public: bytes):
        self.client_public = z85.decode(client_public)
        self.users = 0

    def callback(self, domain: str, client_key: bytes) -> bool:
        return z85.decode(client_key) == self.client_public


class _ContextGuard:
    """The ZAP handler of one zmq context and the domains registered with it."""

    def __init__(self, underlying: int):
        self.authenticator = _start_authenticator(underlying)
        self.domains: dict[str, _Domain] = {}


def _start_authenticator(underlying: int):
    from zmq.auth.thread import ThreadAuthenticator

    for attempt in range(200):
        # a plain (sync) view of the context, whatever kind the inbox uses
        authenticator = ThreadAuthenticator(zmq.Context.shadow(underlying), log=logging.getLogger(__name__ + ".zap"))
        try:
            authenticator.start()
            return authenticator
        except zmq.ZMQError as exc:
            authenticator.stop()
            # a handler just stopped on this context: libzmq frees its endpoint a moment later
            if exc.errno != zmq.EADDRINUSE or attempt == 199:
                raise
            time.sleep(0.005)


_guards: dict[int, _ContextGuard] = {}
_lock = threading.Lock()


def register(context: zmq.Context, keys: CurveKeys) -> None:
    """Admit clients with ``keys`` to this context's inboxes of ``keys.domain``. Pair each call
    with :func:`unregister`. Raises zmq.ZMQError when another ZAP handler owns the context."""
    with _lock:
        guard = _guards.get(context.underlying)
        if guard is None:
            guard = _guards[context.underlying] = _ContextGuard(context.underlying)
        domain = guard.domains.get(keys.domain)
        if domain is None:
            domain = guard.domains[keys.domain] = _Domain(keys.client_public)
            guard.authenticator.configure_curve_callback(keys.domain, domain)
        domain.users += 1


def unregister(context: zmq.Context, keys: CurveKeys) -> None:
    """Undo one :func:`register`; the last one on a context stops its ZAP handler (so the
    context can terminate)."""
    with _lock:
        guard = _guards.get(context.underlying)
        if guard is None or keys.domain not in guard.domains:
            return
        domain = guard.domains[keys.domain]
        domain.users -= 1
        if domain.users > 0:
            return
        del guard.domains[keys.domain]
        guard.authenticator.credentials_providers.pop(keys.domain, None)
        if not guard.domains:
            del _guards[context.underlying]
            guard.authenticator.stop()
