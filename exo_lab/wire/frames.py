"""The data plane's typed messages and their bytes: one place for the wire format.

Per-token traffic never rides ipyparallel. The scheduler sends token ids to stage 0 in a
:class:`Forward`, activations flow stage to stage in Forwards, the last stage samples and sends
a :class:`Token` back. :class:`Free`, :class:`Error`, :class:`Ping` and :class:`Shutdown` share
the same pipe, so they stay ordered with the data.

Every field is typed and fixed-size; there is no JSON and no pickle, so decoding is bounded
work whatever a peer sends. A misspelled or missing field fails at :func:`encode`, a malformed
message at :func:`decode` (:class:`FrameError`), never three stages later.

Wire format, one ZeroMQ multipart message per message:

- frame 0: ``HEADER`` (little-endian ``magic b"EX"``, ``version u8``, ``kind u8``,
  ``request_id u64``), then the kind's body:

  - FORWARD: ``FORWARD_BODY`` (position u32, temperature f64, top_p f64, top_k u32, seed u64,
    tensor dtype code u8, ndim u8, stage count u8), ``ndim`` dims as u32, then one f32 per
    stage that already ran (its forward ms);
  - TOKEN: ``TOKEN_BODY`` (token id u32, stage count u8), then the stages' ms as f32;
  - ERROR: the message as UTF-8 (at most ``MAX_ERROR_BYTES``);
  - FREE, PING, SHUTDOWN: nothing;
- frame 1, FORWARD only: the tensor's raw bytes, C-contiguous, native little-endian.
"""
from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass

import torch

from ..errors import ClusterError
from ..sampling import SamplingSettings

MAGIC = b"EX"
VERSION = 2
HEADER = struct.Struct("<2sBBQ")           # magic, version, kind, request_id
FORWARD_BODY = struct.Struct("<IddIQBBB")  # position, temperature, top_p, top_k, seed, dtype, ndim, stages
TOKEN_BODY = struct.Struct("<IB")          # token id, stages
DIM = struct.Struct("<I")
MS = struct.Struct("<f")
MAX_NDIM = 3                 # token ids (B, T); activations (B, T, hidden)
MAX_STAGES = 255
MAX_ERROR_BYTES = 2048
MAX_REQUEST_ID = 2**64 - 1
MAX_SEED = 2**64 - 1
MAX_TENSOR_BYTES = 256 * 2**20     # as wire.sockets.MAX_MESSAGE_BYTES: no larger tensor can arrive


class Kind(enum.IntEnum):
    """Wire codes of the message kinds: never renumber them."""

    FORWARD = 1
    TOKEN = 2
    FREE = 3
    ERROR = 4
    PING = 5
    SHUTDOWN = 7


class FrameError(ClusterError, ValueError):
    """A data-plane message cannot be encoded or decoded. ``request_id`` is set when the
    header was readable, so a receiver can still answer the right request."""

    def __init__(self, message: str, request_id: int | None = None):
        super().__init__(message)
        self.request_id = request_id


@dataclass(frozen=True, eq=False)   # eq would compare tensors elementwise: ambiguous
class Forward:
    """Run ``tensor`` through the next stage for one request.

    ``tensor``: token ids (1, T) int64 into stage 0, else hidden states (1, T, hidden).
    ``position``: the sequence index of ``tensor[:, 0]`` (0 starts a fresh KV cache).
    ``sampling``: how the last stage picks the token after this step (every step carries it,
    so the last stage keeps no per-request state). ``stage_ms``: forward time of each stage
    that already ran, in pipeline order."""

    request_id: int
    position: int
    tensor: torch.Tensor
    sampling: SamplingSettings
    stage_ms: tuple[float, ...] = ()


@dataclass(frozen=True)
class Token:
    """The last stage's sampled token for one request, with every stage's forward ms."""

    request_id: int
    token_id: int
    stage_ms: tuple[float, ...] = ()


@dataclass(frozen=True)
class Free:
    """The request ended: every stage drops its KV cache and passes this on."""

    request_id: int


@dataclass(frozen=True)
class Error:
    """A stage failed on this request; ``message`` says why (no host names, no internals)."""

    request_id: int
    message: str


@dataclass(frozen=True)
class Ping:
    """Travels the ring unchanged: the pipeline answers."""

    request_id: int


@dataclass(frozen=True)
class Shutdown:
    """Stop the receiving worker after passing this on."""

    request_id: int = 0


Message = Forward | Token | Free | Error | Ping | Shutdown

# dtype <-> wire code: append, never renumber.
_DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.int64: 4, torch.int32: 5,
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
_ITEMSIZES = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in _DTYPE_CODES}
_KIND_OF = {Forward: Kind.FORWARD, Token: Kind.TOKEN, Free: Kind.FREE, Error: Kind.ERROR,
            Ping: Kind.PING, Shutdown: Kind.SHUTDOWN}
_KINDS = {kind.value: kind for kind in Kind}


# ---------------------------------------------------------------------------- encode

def encode(msg: Message) -> list[bytes | memoryview]:
    """Frames for ``msg``: ``[header]``, or ``[header, payload]`` for a Forward.

    The payload is a memoryview of the (CPU, contiguous) tensor's memory, not a copy: do not
    modify the tensor in place until it is sent. Raises :class:`FrameError` for a value the
    wire cannot carry (unknown type, request id outside u64, an unsupported tensor, ...)."""
    kind = _KIND_OF.get(type(msg))
    if kind is None:
        raise FrameError(f"cannot send a {type(msg).__name__}; send one of "
                         f"{', '.join(t.__name__ for t in _KIND_OF)}")
    _check_u64(msg.request_id, "request_id")
    header = HEADER.pack(MAGIC, VERSION, kind, msg.request_id)
    if kind is Kind.FORWARD:
        return _encode_forward(header, msg)
    if kind is Kind.TOKEN:
        _check_range(msg.token_id, 0, 2**32 - 1, "token_id", msg.request_id)
        stage_ms = _pack_ms(msg)
        return [header + TOKEN_BODY.pack(msg.token_id, len(msg.stage_ms)) + stage_ms]
    if kind is Kind.ERROR:
        return [header + _error_bytes(msg.message)]
    return [header]


def _encode_forward(header: bytes, msg: Forward) -> list:
    tensor = _wire_tensor(msg.tensor, msg.request_id)
    s = msg.sampling
    if not isinstance(s, SamplingSettings):
        raise FrameError(f"Forward.sampling must be a SamplingSettings, got {type(s).__name__}",
                         msg.request_id)
    _check_range(msg.position, 0, 2**32 - 1, "position", msg.request_id)
    seed = 0 if s.seed is None else s.seed
    _check_range(seed, 0, MAX_SEED, "sampling.seed", msg.request_id)
    stage_ms = _pack_ms(msg)
    body = FORWARD_BODY.pack(msg.position, float(s.temperature), float(s.top_p), int(s.top_k), seed,
                             _DTYPE_CODES[tensor.dtype], tensor.ndim, len(msg.stage_ms))
    dims = b"".join(DIM.pack(d) for d in tensor.shape)
    return [header + body + dims + stage_ms, _payload(tensor)]


def _pack_ms(msg) -> bytes:
    if len(msg.stage_ms) > MAX_STAGES:
        raise FrameError(f"{len(msg.stage_ms)} stage timings; at most {MAX_STAGES}", msg.request_id)
    try:
        return b"".join(MS.pack(ms) for ms in msg.stage_ms)
    except (struct.error, OverflowError, TypeError) as exc:
        raise FrameError(f"stage_ms must be float32 numbers of milliseconds: {exc}", msg.request_id) from None


def _error_bytes(text: str) -> bytes:
    raw = str(text).encode("utf-8", "replace")
    return raw[:MAX_ERROR_BYTES].decode("utf-8", "ignore").encode()


def _check_u64(value, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_REQUEST_ID:
        raise FrameError(f"{name} must be an int in [0, 2**64), got {value!r}")


def _check_range(value, low: int, high: int, name: str, request_id: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise FrameError(f"{name} must be an int in [{low}, {high}], got {value!r}", request_id)


def _wire_tensor(tensor, request_id: int) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise FrameError(f"Forward.tensor must be a torch.Tensor, got {type(tensor).__name__}",
                         request_id)
    if tensor.dtype not in _DTYPE_CODES:
        names = ", ".join(str(d).removeprefix("torch.") for d in _DTYPE_CODES)
        raise FrameError(f"dtype {tensor.dtype} cannot travel on the data plane; convert the "
                         f"tensor to one of: {names}", request_id)
    if not 1 <= tensor.ndim <= MAX_NDIM:
        raise FrameError(f"tensor has {tensor.ndim} dims; the wire carries 1 to {MAX_NDIM}",
                         request_id)
    if tensor.layout != torch.strided:
        raise FrameError(f"{tensor.layout} tensors cannot travel; send tensor.to_dense()", request_id)
    if not tensor.is_cpu:
        tensor = tensor.cpu()
    if tensor.requires_grad:
        tensor = tensor.detach()
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def _payload(tensor: torch.Tensor):
    if tensor.numel() == 0:
        return b""   # memoryview cannot cast an empty shape
    if tensor.dtype is torch.bfloat16:
        tensor = tensor.view(torch.int16)   # numpy has no bfloat16; the bytes are the same
    return memoryview(tensor.numpy()).cast("B")


# ---------------------------------------------------------------------------- decode

def decode(frames: list) -> Message:
    """The message in ``frames`` (bytes, bytearray, memoryview or ``zmq.Frame``).

    Raises :class:`FrameError` naming what is wrong: frame count, magic, version, a header of
    the wrong length, an unknown kind or dtype, a value out of range, or a payload whose size
    does not match shape x dtype. The work is bounded by the frames' sizes."""
    if not isinstance(frames, (list, tuple)) or len(frames) not in (1, 2):
        count = len(frames) if isinstance(frames, (list, tuple)) else type(frames).__name__
        raise FrameError(f"a data-plane message has 1 or 2 frames, got {count}: the sender is "
                         "not an exo-lab stage or speaks another format")
    header = _as_buffer(frames[0])
    kind, request_id = _unpack_header(header)
    body = header[HEADER.size:]
    if kind is Kind.FORWARD:
        if len(frames) != 2:
            raise FrameError(f"FORWARD for request {request_id} has no payload frame", request_id)
        return _decode_forward(request_id, body, _as_buffer(frames[1]))
    if len(frames) != 1:
        raise FrameError(f"{kind.name} for request {request_id} carries a payload frame", request_id)
    if kind is Kind.TOKEN:
        return _decode_token(request_id, body)
    if kind is Kind.ERROR:
        if len(body) > MAX_ERROR_BYTES:
            raise FrameError(f"ERROR text of request {request_id} is over {MAX_ERROR_BYTES} bytes",
                             request_id)
        return Error(request_id, str(body, "utf-8", "replace"))
    if len(body):
        raise FrameError(f"{kind.name} for request {request_id} has {len(body)} stray bytes", request_id)
    return {Kind.FREE: Free, Kind.PING: Ping, Kind.SHUTDOWN: Shutdown}[kind](request_id)


def _as_buffer(frame) -> memoryview:
    try:
        return memoryview(getattr(frame, "buffer", frame)).cast("B")
    except TypeError as exc:
        raise FrameError(f"a frame must be bytes-like, got {type(frame).__name__}") from exc


def _unpack_header(header: memoryview) -> tuple[Kind, int]:
    if len(header) < HEADER.size:
        raise FrameError(f"header is {len(header)} bytes, shorter than the {HEADER.size} of a "
                         "data-plane header: the sender is not an exo-lab stage")
    magic, version, code, request_id = HEADER.unpack_from(header)
    if magic != MAGIC:
        raise FrameError(f"bad magic {bytes(magic)!r}: the sender is not an exo-lab stage")
    if version != VERSION:
        raise FrameError(f"wire version {version}, this exo-lab speaks {VERSION}: run the same "
                         "exo-lab version on every PC", request_id)
    kind = _KINDS.get(code)
    if kind is None:
        raise FrameError(f"unknown message kind {code} for request {request_id}", request_id)
    return kind, request_id


def _decode_forward(request_id: int, body: memoryview, payload: memoryview) -> Forward:
    if len(body) < FORWARD_BODY.size:
        raise FrameError(f"FORWARD header of request {request_id} is truncated", request_id)
    (position, temperature, top_p, top_k, seed, dtype_code, ndim,
     stages) = FORWARD_BODY.unpack_from(body)
    dtype = _CODE_DTYPES.get(dtype_code)
    if dtype is None or not 1 <= ndim <= MAX_NDIM:
        raise FrameError(f"FORWARD of request {request_id}: dtype code {dtype_code} with {ndim} "
                         "dims is not a tensor this wire carries", request_id)
    expected = FORWARD_BODY.size + DIM.size * ndim + MS.size * stages
    if len(body) != expected:
        raise FrameError(f"FORWARD header of request {request_id} is {len(body)} bytes, its "
                         f"fields need {expected}", request_id)
    shape = struct.unpack_from(f"<{ndim}I", body, FORWARD_BODY.size)
    stage_ms = struct.unpack_from(f"<{stages}f", body, FORWARD_BODY.size + DIM.size * ndim)
    sampling = _sampling(temperature, top_p, top_k, seed, request_id)
    tensor = _tensor_from_payload(payload, dtype, shape, request_id)
    return Forward(request_id, position, tensor, sampling, tuple(stage_ms))


def _sampling(temperature: float, top_p: float, top_k: int, seed: int, request_id: int) -> SamplingSettings:
    from ..errors import RequestError

    try:
        return SamplingSettings(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    except RequestError as exc:
        raise FrameError(f"FORWARD of request {request_id}: {exc}", request_id) from None


def _decode_token(request_id: int, body: memoryview) -> Token:
    if len(body) < TOKEN_BODY.size:
        raise FrameError(f"TOKEN of request {request_id} is truncated", request_id)
    token_id, stages = TOKEN_BODY.unpack_from(body)
    if len(body) != TOKEN_BODY.size + MS.size * stages:
        raise FrameError(f"TOKEN of request {request_id} has the wrong length", request_id)
    return Token(request_id, token_id, tuple(struct.unpack_from(f"<{stages}f", body, TOKEN_BODY.size)))


def _tensor_from_payload(payload: memoryview, dtype: torch.dtype, shape: tuple,
                         request_id: int) -> torch.Tensor:
    itemsize = _ITEMSIZES[dtype]
    if math.prod(max(d, 1) for d in shape) * itemsize > MAX_TENSOR_BYTES:
        raise FrameError(f"tensor of request {request_id} declares shape {list(shape)}: over "
                         f"{MAX_TENSOR_BYTES} bytes even where a dimension is 0", request_id)
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
            # libzmq may place large messages at any offset of its buffer; some kernels
            # assume natural alignment, so pay one copy for those
            tensor = tensor.clone()
    return tensor.reshape(shape)
