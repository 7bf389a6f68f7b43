"""The data plane's sockets: a PULL inbox per stage, a PUSH outbox to the next one.

Each hop is one PUSH socket (:class:`Outbox`) connected to the next stage's PULL socket
(:class:`Inbox`); messages on it arrive in order. The bytes are :mod:`exo_lab.wire.frames`'.

Addresses: an :class:`Inbox` binds ``host`` (``"0.0.0.0"`` for every interface, needed for
remote PCs) and reports ``address`` for peers to connect to. A wildcard is not connectable, so
binding one requires ``advertise_host``: the name or IP other PCs reach this one by. Its
``port`` is one port, 0 (the OS picks: loopback-only clusters), or the ports it may take, tried
in order (``network.port_range``'s data ports, so a PC's firewall needs one rule).

Authentication: every socket takes ``key`` = ``exo_lab.security.derive_key(secret, "data-plane")``.
With it, each connection is CurveZMQ-encrypted and mutually authenticated (:mod:`.auth` says why
and what it costs): a peer without the cluster secret can neither send to an inbox nor read
what travels. An inbox reports refused peers through ``recv``, which raises
:class:`~exo_lab.wire.frames.FrameError` once for them, like a malformed message, so receivers
drop and count both the same way. ``key=None`` is unauthenticated, for tests and benchmarks
only; exo-lab's own pipelines always pass a key.

Bounds: a connection that has not finished its handshake within ``ZMQ_HANDSHAKE_IVL_MS`` (2 s;
libzmq's default is 30 s) is dropped, and an inbox holds at most
``auth.MAX_INBOX_CONNECTIONS`` connections (:class:`~exo_lab.wire.auth.HandshakeMonitor`), so
idle connections cannot take a process's descriptors or stall its pipeline.
"""
from __future__ import annotations

import errno
import logging
from collections.abc import Sequence

import zmq
import zmq.asyncio

from ..errors import ClusterError, ConfigError
from ..limits import ZMQ_HANDSHAKE_IVL_MS
from . import auth
from .frames import FrameError, Message, decode, encode

logger = logging.getLogger(__name__)

# The largest message a socket accepts: a prefill chunk of activations is far below this, and
# a peer cannot make a receiver allocate more.
MAX_MESSAGE_BYTES = 256 * 2**20


_WILDCARD_HOSTS = {"0.0.0.0", "*", "::", ""}


def tcp_address(host: str, port: int | str) -> str:
    """``tcp://host:port``, with IPv6 literals in brackets (port ``"*"``: any, for bind)."""
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def _configure(sock: zmq.Socket, *, ipv6: bool) -> None:
    sock.linger = 0   # a dead peer must never hang close() or interpreter exit
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    # unbounded queues: flow control is the scheduler's bound on requests in flight, and a
    # full high-water mark would block or drop per-token messages
    sock.sndhwm = 0
    sock.rcvhwm = 0
    # notice a peer PC that vanished without closing its connection (power loss, cable)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 30)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 10)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 3)
    sock.setsockopt(zmq.HANDSHAKE_IVL, ZMQ_HANDSHAKE_IVL_MS)
    if ipv6:
        sock.setsockopt(zmq.IPV6, 1)


def _sync_context(context: zmq.Context | None) -> zmq.Context:
    if context is None:
        return zmq.Context.instance()
    if isinstance(context, zmq.asyncio.Context):
        return zmq.Context.shadow(context.underlying)
    return context


def _async_context(context: zmq.Context | None) -> zmq.asyncio.Context:
    if context is None:
        return zmq.asyncio.Context.instance()
    if isinstance(context, zmq.asyncio.Context):
        return context
    return zmq.asyncio.Context.shadow(context.underlying)


def _bind_first_free(sock: zmq.Socket, host: str, ports: int | Sequence[int]) -> None:
    """Bind ``sock`` on the first port of ``ports`` that is free (an int: that one, 0: any)."""
    candidates = (ports,) if isinstance(ports, int) else tuple(ports)
    for port in candidates:
        try:
            sock.bind(tcp_address(host, port or "*"))
            return
        except zmq.ZMQError as exc:
            if exc.errno != errno.EADDRINUSE or len(candidates) == 1:
                raise
    raise zmq.ZMQError(errno.EADDRINUSE, f"every one of the {len(candidates)} ports "
                                         f"{candidates[0]}-{candidates[-1]} is in use")


class _Inbox:
    def __init__(self, context, host: str, port: int | Sequence[int], advertise_host: str | None,
                 key: bytes | None):
        if host in _WILDCARD_HOSTS and not advertise_host:
            raise ConfigError(f"inbox binds the wildcard host {host!r}, which peers cannot "
                              "connect to; pass advertise_host= the hostname or LAN IP other "
                              "PCs reach this one by")
        self._context = context
        self._keys = auth.CurveKeys.from_key(key) if key is not None else None
        self._refused_seen = 0
        self._handshakes: auth.HandshakeMonitor | None = None
        if self._keys is not None:
            auth.register(context, self._keys)
        self._socket = context.socket(zmq.PULL)
        _configure(self._socket, ipv6=":" in host)
        if self._keys is not None:
            auth.make_server(self._socket, self._keys)
        self._handshakes = auth.HandshakeMonitor(self._socket)
        bind_host = "*" if host in _WILDCARD_HOSTS else host
        try:
            _bind_first_free(self._socket, bind_host, port)
        except zmq.ZMQError as exc:
            self.close()
            if not isinstance(port, int):
                raise ClusterError(f"no free port for a data-plane inbox on {host} ({exc}); free some of "
                                   "network.port_range on this PC (other programs, or more engines than "
                                   "ports) or widen port_range in config.yaml, on every PC") from exc
            raise ClusterError(f"cannot bind a data-plane inbox on {host}:{port} ({exc}); use "
                               "an address of this PC and a free port, or port 0 to let the OS "
                               "choose") from exc
        endpoint = self._socket.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.port = self._handshakes.port = int(endpoint.rsplit(":", 1)[1])
        self.address = tcp_address(advertise_host or host, self.port)
        logger.debug("inbox bound on %s, advertised as %s", endpoint, self.address)
        self._timeout_ms = -1

    def _set_timeout(self, timeout_ms: int | None) -> None:
        # RCVTIMEO rather than poll(): pyzmq builds a Poller per poll() call, which costs
        # more than the whole decode; the option is only touched when the timeout changes
        value = -1 if timeout_ms is None else max(0, int(timeout_ms))
        if value != self._timeout_ms:
            self._socket.rcvtimeo = self._timeout_ms = value

    @property
    def authenticated(self) -> bool:
        return self._keys is not None

    @property
    def refused_peers(self) -> int:
        """Connection attempts refused because the peer did not prove the cluster secret."""
        return self._handshakes.count() if self._handshakes is not None and self.authenticated else 0

    def _report_refused(self) -> None:
        refused = self.refused_peers
        if refused > self._refused_seen:
            new, self._refused_seen = refused - self._refused_seen, refused
            raise FrameError(f"refused {new} connection attempt(s) by peers without the cluster "
                             "secret (CurveZMQ authentication); nothing they sent was read")

    def close(self) -> None:
        if self._handshakes is not None:
            self._handshakes.close()
            self._handshakes = None
        self._socket.close(linger=0)
        if self._keys is not None:
            auth.unregister(self._context, self._keys)
            self._keys = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class Inbox(_Inbox):
    """A PULL socket bound on ``host:port`` (port 0: the OS picks; a sequence: the first free
    one of them) that receives Messages.

    ``address`` is what peers connect to: ``tcp://{advertise_host or host}:{port}``.
    ``key``: the data-plane key; only outboxes with the same key can connect (None: anyone).
    Raises :class:`~exo_lab.errors.ConfigError` for a wildcard host without
    ``advertise_host`` and :class:`~exo_lab.errors.ClusterError` when the bind fails.
    """

    def __init__(self, context: zmq.Context | None = None, host: str = "127.0.0.1",
                 port: int | Sequence[int] = 0, *, advertise_host: str | None = None,
                 key: bytes | None = None):
        super().__init__(_sync_context(context), host, port, advertise_host, key)

    def recv(self, timeout_ms: int | None = None) -> Message | None:
        """The next message, or None after ``timeout_ms`` (None: wait forever).
        Raises :class:`FrameError` for a malformed message (which is consumed), or once after
        peers without the cluster secret were refused."""
        self._report_refused()
        self._set_timeout(timeout_ms)
        try:
            # zmq.Frames: decode() shares their memory. Measured on loopback: no slower than
            # bytes at 3.5 KB, ~0.5 ms faster at 1 MB (bytes would need a copy to be writable)
            frames = self._socket.recv_multipart(copy=False)
        except zmq.Again:
            return None
        return decode(frames)


class AsyncInbox(_Inbox):
    """:class:`Inbox` for an asyncio event loop (the coordinator's scheduler)."""

    def __init__(self, context: zmq.Context | None = None, host: str = "127.0.0.1",
                 port: int | Sequence[int] = 0, *, advertise_host: str | None = None,
                 key: bytes | None = None):
        super().__init__(_async_context(context), host, port, advertise_host, key)

    async def recv(self, timeout_ms: int | None = None) -> Message | None:
        """The next message, or None after ``timeout_ms`` (None: wait forever).
        Raises :class:`FrameError` for a malformed message (which is consumed), or once after
        peers without the cluster secret were refused."""
        self._report_refused()
        self._set_timeout(timeout_ms)
        try:
            # one atomic multipart recv: with per-frame recvs, another task awaiting this
            # inbox could take the payload frame between our two awaits
            frames = await self._socket.recv_multipart(copy=False)
        except zmq.Again:
            return None
        return decode(frames)


class _Outbox:
    def __init__(self, context, address: str, send_timeout_ms: int, key: bytes | None):
        self.address = address
        self.send_timeout_ms = send_timeout_ms
        self._socket = context.socket(zmq.PUSH)
        _configure(self._socket, ipv6=address.startswith("tcp://["))
        if key is not None:
            auth.make_client(self._socket, auth.CurveKeys.from_key(key))
        # queue only on live connections, so a peer that never came up shows as a send
        # timeout instead of messages waiting silently in a connecting pipe
        self._socket.setsockopt(zmq.IMMEDIATE, 1)
        self._socket.sndtimeo = send_timeout_ms
        try:
            self._socket.connect(address)
        except zmq.ZMQError as exc:
            self._socket.close()
            raise ClusterError(f"cannot connect a data-plane outbox to {address!r} ({exc}); "
                               "expected tcp://host:port as reported by Inbox.address") from exc

    def _timeout_error(self, exc: zmq.Again) -> ClusterError:
        return ClusterError(f"no stage took a message at {self.address} within "
                            f"{self.send_timeout_ms} ms: is its worker running, is that address "
                            "reachable from this PC (firewall, advertised host), and do both PCs "
                            "hold the same cluster secret?")

    def close(self, linger_ms: int = 0) -> None:
        """Close; messages still queued are dropped unless ``linger_ms`` > 0 (use it after a
        final SHUTDOWN)."""
        self._socket.close(linger=linger_ms)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class Outbox(_Outbox):
    """A PUSH socket connected to a peer's :attr:`Inbox.address`; messages arrive in order.
    ``key``: the data-plane key, the same as the inbox's (None: no authentication).

    Payloads of 64 KB and more are sent without a copy: do not modify the tensor in place
    after ``send``. ``send`` raises :class:`~exo_lab.errors.ClusterError` when no peer has
    accepted the connection within ``send_timeout_ms``.
    """

    def __init__(self, context: zmq.Context | None, address: str, *,
                 send_timeout_ms: int = 10_000, key: bytes | None = None):
        super().__init__(_sync_context(context), address, send_timeout_ms, key)

    def send(self, msg: Message) -> None:
        try:
            self._socket.send_multipart(encode(msg), copy=False)
        except zmq.Again as exc:
            raise self._timeout_error(exc) from exc


class AsyncOutbox(_Outbox):
    """:class:`Outbox` for an asyncio event loop (the coordinator's scheduler)."""

    def __init__(self, context: zmq.Context | None, address: str, *,
                 send_timeout_ms: int = 10_000, key: bytes | None = None):
        super().__init__(_async_context(context), address, send_timeout_ms, key)

    async def send(self, msg: Message) -> None:
        try:
            await self._socket.send_multipart(encode(msg), copy=False)
        except zmq.Again as exc:
            raise self._timeout_error(exc) from exc


