"""The data plane: the per-token wire format and the pyzmq sockets between pipeline stages.

Per-token traffic never rides ipyparallel. The scheduler sends token ids to stage 0, activations
flow stage to stage, the last stage samples and sends token ids back. Each hop is one PUSH socket
(:class:`Outbox`) connected to the next stage's PULL socket (:class:`Inbox`), so control messages
that must stay ordered with the data (FREE a request's KV cache, SHUTDOWN) share the same pipe.

Wire format, one ZeroMQ multipart message per :class:`Message`:

- frame 0, the header: ``HEADER`` (little-endian ``magic b"EX"``, ``version u8``, ``kind u8``,
  ``request_id u64``, ``dtype code u8`` (0 = no tensor), ``ndim u8``), then ``ndim`` dims as
  ``u64``, then the meta dict as UTF-8 JSON (empty bytes for an empty dict);
- frame 1, only when there is a tensor: its raw bytes, C-contiguous, native little-endian.

No pickle anywhere: a peer can at worst send bytes that :func:`decode` rejects with
:class:`FrameError`.

Addresses: an :class:`Inbox` binds ``host`` (``"0.0.0.0"`` for every interface, needed for
remote PCs) and reports ``address`` for peers to connect to. A wildcard is not connectable, so
binding one requires ``advertise_host``: the name or IP other PCs reach this one by (the device's
``hostname`` from config.yaml, or its LAN IP).
"""
from __future__ import annotations

import enum
import json
import logging
import math
import statistics
import struct
import threading
import time
from dataclasses import dataclass, field

import torch
import zmq
import zmq.asyncio

from .errors import ClusterError, ConfigError

logger = logging.getLogger(__name__)

MAGIC = b"EX"
VERSION = 1
HEADER = struct.Struct("<2sBBQBB")   # magic, version, kind, request_id, dtype code, ndim
DIM = struct.Struct("<Q")
MAX_NDIM = 8
MAX_REQUEST_ID = 2**64 - 1


class Kind(enum.IntEnum):
    """What a message asks of its receiver. The values are wire codes: never renumber them."""

    FORWARD = 1     # run these token ids / activations through the stage (meta: positions, ...)
    TOKEN = 2       # last stage -> scheduler: sampled token ids of one request
    FREE = 3        # the request ended: drop its KV cache (and pass FREE on down the pipeline)
    ERROR = 4       # a stage failed on this request; meta["error"] says why
    PING = 5        # liveness / latency probe; answered with PONG
    PONG = 6
    SHUTDOWN = 7    # stop the stage worker after passing SHUTDOWN on


# dtype <-> wire code. Codes are part of the wire format: append, never renumber.
_DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.int64: 4,
    torch.int32: 5, torch.uint8: 6, torch.bool: 7, torch.float64: 8,
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
_ITEMSIZES = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in _DTYPE_CODES}
_KINDS = {kind.value: kind for kind in Kind}   # a dict lookup is 10x cheaper than Kind(code)
_META_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_META_DECODER = json.JSONDecoder()


class FrameError(ClusterError, ValueError):
    """A data-plane message cannot be encoded or decoded. ``request_id`` is set when known,
    so the receiver can still answer the right request with an ERROR."""

    def __init__(self, message: str, request_id: int | None = None):
        super().__init__(message)
        self.request_id = request_id


@dataclass(frozen=True, eq=False)   # eq would compare tensors elementwise: ambiguous
class Message:
    """One data-plane message.

    ``meta`` is a small JSON-able dict (positions, sampling parameters on a request's first
    step, error text). ``tensor`` holds token ids (int64) or activations (float32, bfloat16,
    float16); a received tensor is writable and owns or shares the received frame's memory.
    """

    kind: Kind
    request_id: int
    meta: dict = field(default_factory=dict)
    tensor: torch.Tensor | None = None


# ---------------------------------------------------------------------------- wire format


def encode(msg: Message) -> list[bytes | memoryview]:
    """Frames for ``msg``: ``[header]`` or ``[header, payload]``.

    The payload is a memoryview of the (CPU, contiguous) tensor's memory, not a copy: the
    caller must not modify that tensor in place until the frames are sent. A GPU tensor is
    copied to the CPU here. Raises :class:`FrameError` for an unknown kind, a request id
    outside u64, non-JSON meta, or an unsupported tensor.
    """
    tensor = _wire_tensor(msg.tensor, msg.request_id)
    header = _pack_header(msg, tensor)
    if tensor is None:
        return [header]
    if tensor.numel() == 0:
        return [header, b""]   # memoryview cannot cast an empty shape
    if tensor.dtype is torch.bfloat16:
        tensor = tensor.view(torch.int16)   # numpy has no bfloat16; the bytes are the same
    return [header, memoryview(tensor.numpy()).cast("B")]


def decode(frames: list) -> Message:
    """The :class:`Message` in ``frames`` (bytes, bytearray, memoryview or ``zmq.Frame``).

    Raises :class:`FrameError` naming what is wrong: frame count, magic, version, a truncated
    header, unknown kind or dtype, bad meta JSON, or a payload whose size does not match
    shape x dtype.
    """
    if not isinstance(frames, (list, tuple)) or len(frames) not in (1, 2):
        count = len(frames) if isinstance(frames, (list, tuple)) else type(frames).__name__
        raise FrameError(f"a data-plane message has 1 or 2 frames (header, payload), got "
                         f"{count}: the sender is not an exo-lab stage or speaks another format")
    header = _as_buffer(frames[0])
    kind, request_id, dtype, shape, meta = _unpack_header(header)
    if dtype is None:
        if len(frames) != 1:
            raise FrameError(f"{kind.name} message for request {request_id} has no tensor in "
                             "its header but carries a payload frame", request_id)
        return Message(kind, request_id, meta)
    if len(frames) != 2:
        raise FrameError(f"{kind.name} message for request {request_id} declares a {dtype} "
                         f"tensor of shape {list(shape)} but its payload frame is missing",
                         request_id)
    tensor = _tensor_from_payload(_as_buffer(frames[1]), dtype, shape, request_id)
    return Message(kind, request_id, meta, tensor)


def _wire_tensor(tensor: torch.Tensor | None, request_id: int) -> torch.Tensor | None:
    if tensor is None:
        return None
    if not isinstance(tensor, torch.Tensor):
        raise FrameError(f"Message.tensor must be a torch.Tensor or None, got "
                         f"{type(tensor).__name__}", request_id)
    if tensor.dtype not in _DTYPE_CODES:
        names = ", ".join(str(d).removeprefix("torch.") for d in _DTYPE_CODES)
        raise FrameError(f"dtype {tensor.dtype} cannot travel on the data plane; convert the "
                         f"tensor to one of: {names}", request_id)
    if tensor.ndim > MAX_NDIM:
        raise FrameError(f"tensor has {tensor.ndim} dims, the wire format carries at most "
                         f"{MAX_NDIM}; reshape it before sending", request_id)
    if tensor.layout != torch.strided:
        raise FrameError(f"{tensor.layout} tensors cannot travel on the data plane; send "
                         "tensor.to_dense()", request_id)
    if not tensor.is_cpu:
        tensor = tensor.cpu()
    if tensor.requires_grad:
        tensor = tensor.detach()
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def _pack_header(msg: Message, tensor: torch.Tensor | None) -> bytes:
    kind = _KINDS.get(msg.kind) if isinstance(msg.kind, int) else None
    if kind is None:
        raise FrameError(f"unknown message kind {msg.kind!r}; use a dataplane.Kind "
                         f"({', '.join(k.name for k in Kind)})")
    if not isinstance(msg.request_id, int) or not 0 <= msg.request_id <= MAX_REQUEST_ID:
        raise FrameError(f"request_id must be an int in [0, 2**64), got {msg.request_id!r}")
    if not isinstance(msg.meta, dict):
        raise FrameError(f"Message.meta must be a dict, got {type(msg.meta).__name__}",
                         msg.request_id)
    dtype_code = 0 if tensor is None else _DTYPE_CODES[tensor.dtype]
    shape = () if tensor is None else tuple(tensor.shape)
    parts = [HEADER.pack(MAGIC, VERSION, kind, msg.request_id, dtype_code, len(shape))]
    parts.extend(DIM.pack(d) for d in shape)
    if msg.meta:
        parts.append(_dump_meta(msg.meta, msg.request_id))
    return b"".join(parts)


def _dump_meta(meta: dict, request_id: int) -> bytes:
    try:
        return _META_ENCODER.encode(meta).encode()
    except (TypeError, ValueError) as exc:
        raise FrameError(f"meta of request {request_id} is not JSON-serialisable ({exc}); "
                         "send plain numbers, strings, lists and dicts, tensors as the "
                         "message's tensor", request_id) from exc


def _as_buffer(frame) -> memoryview:
    try:
        return memoryview(getattr(frame, "buffer", frame)).cast("B")
    except TypeError as exc:
        raise FrameError(f"a data-plane frame must be bytes-like or a zmq.Frame, got "
                         f"{type(frame).__name__}") from exc


def _unpack_header(header: memoryview):
    if len(header) < HEADER.size:
        raise FrameError(f"truncated header: {len(header)} bytes, a data-plane header has at "
                         f"least {HEADER.size}; the sender is not an exo-lab stage")
    magic, version, kind_code, request_id, dtype_code, ndim = HEADER.unpack_from(header)
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r} (expected {MAGIC!r}): this message was not "
                         "sent by an exo-lab stage; check which process connects to this inbox")
    if version != VERSION:
        raise FrameError(f"wire format version {version}, this exo-lab speaks {VERSION}: "
                         "install the same exo-lab version on every PC", request_id)
    kind = _KINDS.get(kind_code)
    if kind is None:
        raise FrameError(f"unknown message kind {kind_code} for request {request_id}; the "
                         "sender runs a different exo-lab version", request_id)
    dtype = _header_dtype(dtype_code, ndim, request_id)
    meta_start = HEADER.size + DIM.size * ndim
    if len(header) < meta_start:
        raise FrameError(f"truncated header: {len(header)} bytes, but {ndim} dims need "
                         f"{meta_start}", request_id)
    shape = struct.unpack_from(f"<{ndim}Q", header, HEADER.size)
    return kind, request_id, dtype, shape, _load_meta(header[meta_start:], request_id)


def _header_dtype(dtype_code: int, ndim: int, request_id: int) -> torch.dtype | None:
    if dtype_code == 0:
        if ndim:
            raise FrameError(f"header of request {request_id} has {ndim} dims but no tensor "
                             "dtype", request_id)
        return None
    if dtype_code not in _CODE_DTYPES:
        raise FrameError(f"unknown tensor dtype code {dtype_code} for request {request_id}; "
                         "the sender runs a different exo-lab version", request_id)
    if ndim > MAX_NDIM:
        raise FrameError(f"header of request {request_id} declares {ndim} dims, at most "
                         f"{MAX_NDIM} are allowed", request_id)
    return _CODE_DTYPES[dtype_code]


def _load_meta(raw: memoryview, request_id: int) -> dict:
    if not raw:
        return {}
    try:
        meta = _META_DECODER.decode(str(raw, "utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FrameError(f"meta of request {request_id} is not valid JSON ({exc})",
                         request_id) from exc
    if not isinstance(meta, dict):
        raise FrameError(f"meta of request {request_id} must be a JSON object, got "
                         f"{type(meta).__name__}", request_id)
    return meta


def _tensor_from_payload(payload: memoryview, dtype: torch.dtype, shape: tuple,
                         request_id: int) -> torch.Tensor:
    itemsize = _ITEMSIZES[dtype]
    expected = math.prod(shape) * itemsize
    if len(payload) != expected:
        raise FrameError(f"payload of request {request_id} has {len(payload)} bytes, but shape "
                         f"{list(shape)} x {dtype} needs {expected}", request_id)
    if expected == 0:
        return torch.empty(shape, dtype=dtype)   # frombuffer refuses empty buffers
    if payload.readonly:
        # bytes: torch would warn on a read-only buffer, and a stage may write in place
        tensor = torch.frombuffer(bytearray(payload), dtype=dtype)
    else:
        tensor = torch.frombuffer(payload, dtype=dtype)   # shares the zmq frame's memory
        if tensor.data_ptr() % itemsize:
            # libzmq may place large messages at any offset of its receive buffer; some
            # kernels assume natural alignment, so pay one copy for those
            tensor = tensor.clone()
    return tensor if len(shape) == 1 else tensor.reshape(shape)


# ---------------------------------------------------------------------------- transport

_WILDCARD_HOSTS = {"0.0.0.0", "*", "::", ""}


def tcp_address(host: str, port: int | str) -> str:
    """``tcp://host:port``, with IPv6 literals in brackets (port ``"*"``: any, for bind)."""
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def _configure(sock: zmq.Socket, *, ipv6: bool) -> None:
    sock.linger = 0   # a dead peer must never hang close() or interpreter exit
    # unbounded queues: flow control is the scheduler's bound on requests in flight, and a
    # full high-water mark would block or drop per-token messages
    sock.sndhwm = 0
    sock.rcvhwm = 0
    # notice a peer PC that vanished without closing its connection (power loss, cable)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 30)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 10)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 3)
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


class _Inbox:
    def __init__(self, context, host: str, port: int, advertise_host: str | None):
        if host in _WILDCARD_HOSTS and not advertise_host:
            raise ConfigError(f"inbox binds the wildcard host {host!r}, which peers cannot "
                              "connect to; pass advertise_host= the hostname or LAN IP other "
                              "PCs reach this one by")
        self._socket = context.socket(zmq.PULL)
        _configure(self._socket, ipv6=":" in host)
        bind_host = "*" if host in _WILDCARD_HOSTS else host
        try:
            self._socket.bind(tcp_address(bind_host, port or "*"))
        except zmq.ZMQError as exc:
            self._socket.close()
            raise ClusterError(f"cannot bind a data-plane inbox on {host}:{port} ({exc}); use "
                               "an address of this PC and a free port, or port 0 to let the OS "
                               "choose") from exc
        endpoint = self._socket.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.port = int(endpoint.rsplit(":", 1)[1])
        self.address = tcp_address(advertise_host or host, self.port)
        logger.debug("inbox bound on %s, advertised as %s", endpoint, self.address)
        self._timeout_ms = -1

    def _set_timeout(self, timeout_ms: int | None) -> None:
        # RCVTIMEO rather than poll(): pyzmq builds a Poller per poll() call, which costs
        # more than the whole decode; the option is only touched when the timeout changes
        value = -1 if timeout_ms is None else max(0, int(timeout_ms))
        if value != self._timeout_ms:
            self._socket.rcvtimeo = self._timeout_ms = value

    def close(self) -> None:
        self._socket.close(linger=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class Inbox(_Inbox):
    """A PULL socket bound on ``host:port`` (port 0: the OS picks) that receives Messages.

    ``address`` is what peers connect to: ``tcp://{advertise_host or host}:{port}``.
    Raises :class:`~exo_lab.errors.ConfigError` for a wildcard host without
    ``advertise_host`` and :class:`~exo_lab.errors.ClusterError` when the bind fails.
    """

    def __init__(self, context: zmq.Context | None = None, host: str = "127.0.0.1",
                 port: int = 0, *, advertise_host: str | None = None):
        super().__init__(_sync_context(context), host, port, advertise_host)

    def recv(self, timeout_ms: int | None = None) -> Message | None:
        """The next message, or None after ``timeout_ms`` (None: wait forever).
        Raises :class:`FrameError` for a malformed message (which is consumed)."""
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
                 port: int = 0, *, advertise_host: str | None = None):
        super().__init__(_async_context(context), host, port, advertise_host)

    async def recv(self, timeout_ms: int | None = None) -> Message | None:
        """The next message, or None after ``timeout_ms`` (None: wait forever).
        Raises :class:`FrameError` for a malformed message (which is consumed)."""
        self._set_timeout(timeout_ms)
        try:
            # one atomic multipart recv: with per-frame recvs, another task awaiting this
            # inbox could take the payload frame between our two awaits
            frames = await self._socket.recv_multipart(copy=False)
        except zmq.Again:
            return None
        return decode(frames)


class _Outbox:
    def __init__(self, context, address: str, send_timeout_ms: int):
        self.address = address
        self.send_timeout_ms = send_timeout_ms
        self._socket = context.socket(zmq.PUSH)
        _configure(self._socket, ipv6=address.startswith("tcp://["))
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
                            f"{self.send_timeout_ms} ms: is its worker running, and is that "
                            "address reachable from this PC (firewall, advertised host)?")

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

    Payloads of 64 KB and more are sent without a copy: do not modify the tensor in place
    after ``send``. ``send`` raises :class:`~exo_lab.errors.ClusterError` when no peer has
    accepted the connection within ``send_timeout_ms``.
    """

    def __init__(self, context: zmq.Context | None, address: str, *,
                 send_timeout_ms: int = 10_000):
        super().__init__(_sync_context(context), address, send_timeout_ms)

    def send(self, msg: Message) -> None:
        try:
            self._socket.send_multipart(encode(msg), copy=False)
        except zmq.Again as exc:
            raise self._timeout_error(exc) from exc


class AsyncOutbox(_Outbox):
    """:class:`Outbox` for an asyncio event loop (the coordinator's scheduler)."""

    def __init__(self, context: zmq.Context | None, address: str, *,
                 send_timeout_ms: int = 10_000):
        super().__init__(_async_context(context), address, send_timeout_ms)

    async def send(self, msg: Message) -> None:
        try:
            await self._socket.send_multipart(encode(msg), copy=False)
        except zmq.Again as exc:
            raise self._timeout_error(exc) from exc


# ---------------------------------------------------------------------------- measurement


def measure_hop_overhead(n: int = 2000, payload_bytes: int = 3584, *,
                         warmup: int = 100) -> dict:
    """One-way time of a data-plane hop on loopback, in ms (ping-pong round trip / 2 between
    two threads, encode and decode included), next to a bare zmq PAIR baseline that sends the
    same bytes. Returns ``{"n", "payload_bytes", "hop_median_ms", "hop_p90_ms",
    "pair_median_ms", "pair_p90_ms"}``. The project target is a hop median <= 0.3 ms."""
    if n < 1 or payload_bytes < 0:
        raise ValueError(f"need n >= 1 and payload_bytes >= 0, got n={n}, "
                         f"payload_bytes={payload_bytes}")
    context = zmq.Context()
    try:
        hop = _ping_pong_ms(*_dataplane_pair(context, payload_bytes), n, warmup)
        pair = _ping_pong_ms(*_zmq_pair(context, payload_bytes), n, warmup)
    finally:
        context.term()
    return {"n": n, "payload_bytes": payload_bytes,
            "hop_median_ms": statistics.median(hop), "hop_p90_ms": _p90(hop),
            "pair_median_ms": statistics.median(pair), "pair_p90_ms": _p90(pair)}


def _p90(samples: list[float]) -> float:
    return sorted(samples)[min(len(samples) - 1, int(0.9 * len(samples)))]


def _payload_tensor(payload_bytes: int) -> torch.Tensor:
    if payload_bytes % 4 == 0:
        return torch.randn(payload_bytes // 4)
    return torch.randint(0, 256, (payload_bytes,), dtype=torch.uint8)


def _dataplane_pair(context: zmq.Context, payload_bytes: int):
    """(ping, echo): ping(i) sends and waits for the reply; echo() answers until SHUTDOWN."""
    tensor = _payload_tensor(payload_bytes)
    near, far = Inbox(context), Inbox(context)
    to_far, to_near = Outbox(context, far.address), Outbox(context, near.address)

    def ping(i: int) -> None:
        to_far.send(Message(Kind.FORWARD, i, {"position": i}, tensor))
        if near.recv(timeout_ms=5000) is None:
            raise ClusterError("hop measurement: no echo within 5000 ms")

    def echo() -> None:
        while (msg := far.recv(timeout_ms=5000)) is not None and msg.kind != Kind.SHUTDOWN:
            to_near.send(Message(Kind.FORWARD, msg.request_id, msg.meta, msg.tensor))

    def stop() -> None:
        to_far.send(Message(Kind.SHUTDOWN, 0))

    def close() -> None:
        for sock in (near, far, to_far, to_near):
            sock.close()

    return ping, echo, stop, close


def _zmq_pair(context: zmq.Context, payload_bytes: int):
    payload = bytes(payload_bytes)
    near, far = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    far.connect(f"tcp://127.0.0.1:{near.bind_to_random_port('tcp://127.0.0.1')}")
    near.rcvtimeo = far.rcvtimeo = 5000

    def ping(i: int) -> None:
        near.send(payload)
        near.recv()

    def echo() -> None:
        while (data := far.recv()) != b"stop":
            far.send(data)

    def stop() -> None:
        near.send(b"stop")

    def close() -> None:
        near.close(linger=0)
        far.close(linger=0)

    return ping, echo, stop, close


def _ping_pong_ms(ping, echo, stop, close, n: int, warmup: int) -> list[float]:
    thread = threading.Thread(target=echo, name="exo-lab-hop-echo", daemon=True)
    thread.start()
    try:
        for i in range(warmup):
            ping(i)
        samples = []
        for i in range(n):
            start_ns = time.perf_counter_ns()
            ping(i)
            samples.append((time.perf_counter_ns() - start_ns) / 2e6)   # one way, ms
    finally:
        try:
            stop()
        finally:
            thread.join(timeout=10)   # the echo's recv timeout ends it even if stop() failed
            close()
    return samples
