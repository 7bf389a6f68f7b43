"""The data plane's typed messages and their bytes: one place for the wire format.

Per-token traffic never rides ipyparallel. Each scheduler step sends one :class:`Forward` per
micro-batch: token ids into stage 0, activations stage to stage, each row naming its KV slot,
its position and its sampling settings. The last stage samples the rows that ask for it and
sends one :class:`Sampled` back. :class:`Free`, :class:`Error`, :class:`Ping` and
:class:`Shutdown` share the same pipe, so they stay ordered with the data.

Every field is typed and fixed-size; there is no JSON and no pickle, so decoding is bounded
work whatever a peer sends. A misspelled or missing field fails at :func:`encode`, a malformed
message at :func:`decode` (:class:`FrameError`), never three stages later.

Wire format, one ZeroMQ multipart message per message:

- frame 0: ``HEADER`` (little-endian ``magic b"EX"``, ``version u8``, ``kind u8``, ``id u64``:
  the step id of a Forward, Sampled or Error, else the message's own id), then the kind's body:

  - FORWARD: ``FORWARD_BODY`` (rows u16, tensor dtype code u8, ndim u8, stage count u8),
    ``ndim`` dims as u32, one ``ROW`` per row (slot u16, position u32, flags u8 (1 = sample,
    2 = verify: sample at every position),
    temperature f64, top_p f64, top_k u32, seed u64), then one f32 per stage that already ran
    (its forward ms), then one ``ROW_EXTRA`` per row (logprobs i8, embed u8, rule flag u8 (0
    none, 1 bias only, 2 mask and bias), mask bytes u32, bias entries u16, LoRA adapter u16), then the rules of
    the rows that have one, in row order: the mask bytes, then ``BIAS`` (token u32, bias f64)
    per entry;
  - SAMPLED: ``SAMPLED_BODY`` (rows u16, stage count u8), one u32 token id per row
    (``NO_TOKEN`` for a row that did not sample), then the stages' ms as f32, then
    ``SAMPLED_EXTRA`` (hidden u32: 0 when no vectors follow; verified u8: 1 when verify samples
    follow), then per row a u8 count of top alternatives (``NO_LOGPROB``: none) followed by
    count + 1 ``LOGPROB`` (token u32, logprob f64), the chosen token first, then when verified
    per row a u8 count (0 for a row that did not verify, at most MAX_VERIFIED) and that many u32
    token ids, then the vectors (rows x hidden f32);
  - FREE: the slot as u16; ERROR: the message as UTF-8 (at most ``MAX_ERROR_BYTES``);
  - COPY: ``COPY_BODY`` (src slot u16, dst slot u16, length u32);
  - SHORT: ``SHORT_BODY`` (stage u16, free bytes u64, needed bytes u64);
  - PING, SHUTDOWN: nothing;
  - TRAIN_FORWARD, TRAIN_BACKWARD (fine-tuning): ``TRAIN_BODY`` (micro-batch u16, dtype code u8,
    ndim u8, loss scale f64), the dims as u32, then (forward) the targets as int32 (B x T);
  - TRAIN_LOSS: ``LOSS_BODY`` (micro-batch u16, loss f64, target tokens u32);
  - TRAIN_STEP: ``STEP_BODY`` (micro-batches u16, phase u8, value f64, learning rate f64);
- frame 1, FORWARD, TRAIN_FORWARD and TRAIN_BACKWARD only: the tensor's raw bytes, C-contiguous,
  native little-endian.
"""
from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass

import torch

from ..errors import ClusterError
from ..sampling import MAX_ALLOWED_BYTES, MAX_LOGPROBS, MAX_RULE_BIAS, MAX_SEED, LogitRule, SamplingSettings, TokenLogprob

MAGIC = b"EX"
VERSION = 7
HEADER = struct.Struct("<2sBBQ")           # magic, version, kind, id
FORWARD_BODY = struct.Struct("<HBBB")      # rows, dtype, ndim, stages
ROW = struct.Struct("<HIBddIQ")            # slot, position, flags, temperature, top_p, top_k, seed
ROW_EXTRA = struct.Struct("<bBBIHH")      # logprobs (-1: none), embed, has rule, allowed bytes, bias entries, adapter
BIAS = struct.Struct("<Id")                # token id, bias
SAMPLED_BODY = struct.Struct("<HB")        # rows, stages
SAMPLED_EXTRA = struct.Struct("<IB")       # hidden size of the vectors (0: none), verify samples follow
LOGPROB_COUNT = struct.Struct("<B")        # top alternatives of a row's logprob (NO_LOGPROB: none)
LOGPROB = struct.Struct("<Id")             # token id, logprob
NO_LOGPROB = 0xFF
COPY_BODY = struct.Struct("<HHI")          # src slot, dst slot, length
SHORT_BODY = struct.Struct("<HQQ")         # stage, its PC's free bytes, what the step needed
TRAIN_BODY = struct.Struct("<HBBd")        # micro-batch, tensor dtype code, ndim, loss scale
LOSS_BODY = struct.Struct("<HdI")          # micro-batch, loss, target tokens
STEP_BODY = struct.Struct("<HBdd")         # micro-batches, phase, value, learning rate
MAX_ADAPTER = 2**16 - 1
SLOT = struct.Struct("<H")
DIM = struct.Struct("<I")
MS = struct.Struct("<f")
NO_TOKEN = 2**32 - 1         # a row that did not sample (a prefill chunk before the prompt's end)
MAX_ROWS = 2**16 - 1
MAX_NDIM = 3                 # token ids (B, T); activations (B, T, hidden)
MAX_STAGES = 255
MAX_ERROR_BYTES = 2048
MAX_REQUEST_ID = 2**64 - 1
MAX_TENSOR_BYTES = 256 * 2**20     # as wire.sockets.MAX_MESSAGE_BYTES: no larger tensor can arrive
EMBED_POOLINGS = (0, 1, 2)   # a normal row; last-token pooling; mean pooling (the chunk's sum)
MAX_VERIFIED = 64            # positions of one verify row (the last token and its drafts)
SAMPLE, VERIFY = 1, 2        # Row flags


class Kind(enum.IntEnum):
    """Wire codes of the message kinds: never renumber them."""

    FORWARD = 1
    SAMPLED = 2
    FREE = 3
    ERROR = 4
    PING = 5
    SHUTDOWN = 7
    COPY = 8
    SHORT = 9
    TRAIN_FORWARD = 10
    TRAIN_BACKWARD = 11
    TRAIN_LOSS = 12
    TRAIN_STEP = 13


class FrameError(ClusterError, ValueError):
    """A data-plane message cannot be encoded or decoded. ``message_id`` is set when the
    header was readable, so a receiver can still answer the right request."""

    def __init__(self, message: str, message_id: int | None = None):
        super().__init__(message)
        self.message_id = message_id


@dataclass(frozen=True)
class Row:
    """One sequence of a step: the KV slot it owns on every stage, the sequence position of its
    first input token, whether the last stage samples a token for it, and how: ``rule`` (bias and
    allowed mask, applied before sampling), ``logprobs`` (-1: none; 0..20: the chosen token's
    logprob and that many alternatives), ``embed`` (0: a normal row; 1: return the last position's
    final hidden state; 2: the sum of the chunk's final hidden states, for mean pooling),
    ``verify`` (speculative decoding: sample at every position, each as if it were the last; a
    verify row samples, with no rule, logprobs or embed), ``adapter`` (the LoRA adapter the row
    runs with, as the stages registered it; 0: the base model)."""

    slot: int
    position: int
    sampling: SamplingSettings
    sample: bool = True
    rule: LogitRule | None = None
    logprobs: int = -1
    embed: int = 0
    verify: bool = False
    adapter: int = 0


@dataclass(frozen=True, eq=False)   # eq would compare tensors elementwise: ambiguous
class Forward:
    """Run ``tensor`` through the next stage for one micro-batch of rows.

    ``tensor``: token ids (B, T) int64 into stage 0, else hidden states (B, T, hidden); row b of
    the tensor is ``rows[b]``. Every step carries each row's sampling settings, so the last
    stage keeps no per-request state. ``stage_ms``: forward time of each stage that already ran."""

    step_id: int
    rows: tuple[Row, ...]
    tensor: torch.Tensor
    stage_ms: tuple[float, ...] = ()


@dataclass(frozen=True, eq=False)   # vectors: a tensor
class Sampled:
    """The last stage's answer to one step: a token id per row (NO_TOKEN where the row did not
    sample), with every stage's forward ms; ``logprobs``: one per row (None where not asked), or
    () when no row asked; ``vectors``: float32 (B, hidden) pooled final hidden states of the
    embed rows (zeros for the others), or None when no row embeds; ``verified``: per row the
    token sampled at each position of a verify row (() for the others), or () when no row
    verified."""

    step_id: int
    token_ids: tuple[int, ...]
    stage_ms: tuple[float, ...] = ()
    logprobs: tuple[TokenLogprob | None, ...] = ()
    vectors: torch.Tensor | None = None
    verified: tuple[tuple[int, ...], ...] = ()

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sampled):
            return NotImplemented
        same_vectors = (self.vectors is None) == (other.vectors is None) and (
            self.vectors is None or torch.equal(self.vectors, other.vectors))
        return (self.step_id, self.token_ids, self.stage_ms, self.logprobs, self.verified) == (
            other.step_id, other.token_ids, other.stage_ms, other.logprobs, other.verified) and same_vectors


@dataclass(frozen=True)
class Copy:
    """Every stage copies the first ``length`` KV positions of ``src_slot`` into ``dst_slot``
    (n choices sharing one prefill)."""

    message_id: int
    src_slot: int
    dst_slot: int
    length: int


@dataclass(frozen=True)
class Free:
    """A request left ``slot``: stages stop counting it as active (its KV may be reused)."""

    message_id: int
    slot: int


@dataclass(frozen=True)
class Error:
    """A stage failed on this step; ``message`` says why (no host names, no internals)."""

    step_id: int
    message: str


@dataclass(frozen=True)
class Short:
    """A stage refused this step before allocating: its PC had ``free_bytes`` free and the
    step needed ``needed_bytes`` (the PC's memory shrank). The step's rows are not lost: the
    coordinator sheds KV slots and replays them."""

    step_id: int
    stage: int
    free_bytes: int
    needed_bytes: int


@dataclass(frozen=True)
class Ping:
    """Travels the ring unchanged: the pipeline answers."""

    message_id: int


@dataclass(frozen=True)
class Shutdown:
    """Stop the receiving worker after passing this on."""

    message_id: int = 0


@dataclass(frozen=True, eq=False)   # tensors
class TrainForward:
    """Fine-tuning: micro-batch ``micro`` of batch ``batch_id`` forward through the next stage,
    with autograd. ``tensor``: token ids (B, T) into stage 0, else hidden states (B, T, hidden);
    ``targets``: int32 (B, T), the token each position must predict (-100: no loss there),
    carried to the last stage; ``scale``: what the last stage multiplies the summed loss by
    (1 / the batch's target tokens)."""

    batch_id: int
    micro: int
    tensor: torch.Tensor
    targets: torch.Tensor
    scale: float


@dataclass(frozen=True, eq=False)   # a tensor
class TrainBackward:
    """Fine-tuning: the loss's gradient with respect to micro-batch ``micro``'s output of the
    stage before (sent upstream, to that stage's inbox)."""

    batch_id: int
    micro: int
    tensor: torch.Tensor


@dataclass(frozen=True)
class TrainLoss:
    """Fine-tuning: the last stage's loss of one micro-batch (scaled; ``tokens`` with a target)."""

    batch_id: int
    micro: int
    loss: float
    tokens: int


@dataclass(frozen=True)
class TrainStep:
    """Fine-tuning: close batch ``batch_id`` of ``micros`` micro-batches, around the ring. Phase
    0: each stage (the first once all its backward passes are done) adds the squared norm of
    its adapters' gradients to ``value``; phase 1: each stage scales its gradients by ``value``
    (the clip coefficient), steps its optimizer at learning rate ``lr`` and clears them."""

    batch_id: int
    micros: int
    phase: int
    value: float
    lr: float


Message = Forward | Sampled | Free | Error | Ping | Shutdown | Copy | Short | TrainForward | TrainBackward \
    | TrainLoss | TrainStep
TRAINING = (TrainForward, TrainBackward, TrainLoss, TrainStep)

# dtype <-> wire code: append, never renumber.
_DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.int64: 4, torch.int32: 5,
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
_ITEMSIZES = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in _DTYPE_CODES}
_KIND_OF = {Forward: Kind.FORWARD, Sampled: Kind.SAMPLED, Free: Kind.FREE, Error: Kind.ERROR,
            Ping: Kind.PING, Shutdown: Kind.SHUTDOWN, Copy: Kind.COPY, Short: Kind.SHORT,
            TrainForward: Kind.TRAIN_FORWARD, TrainBackward: Kind.TRAIN_BACKWARD, TrainLoss: Kind.TRAIN_LOSS,
            TrainStep: Kind.TRAIN_STEP}
_KINDS = {kind.value: kind for kind in Kind}


# ---------------------------------------------------------------------------- encode

def encode(msg: Message) -> list[bytes | memoryview]:
    """Frames for ``msg``: ``[header]``, or ``[header, payload]`` for a Forward.

    The payload is a memoryview of the (CPU, contiguous) tensor's memory, not a copy: do not
    modify the tensor in place until it is sent. Raises :class:`FrameError` for a value the
    wire cannot carry (unknown type, an id outside u64, an unsupported tensor, ...)."""
    kind = _KIND_OF.get(type(msg))
    if kind is None:
        raise FrameError(f"cannot send a {type(msg).__name__}; send one of "
                         f"{', '.join(t.__name__ for t in _KIND_OF)}")
    message_id = msg_id(msg)
    _check_u64(message_id, "the message id")
    header = HEADER.pack(MAGIC, VERSION, kind, message_id)
    if kind is Kind.FORWARD:
        return _encode_forward(header, msg)
    if kind is Kind.SAMPLED:
        return [header + _encode_sampled(msg)]
    if kind is Kind.FREE:
        _check_range(msg.slot, 0, MAX_ROWS, "slot", message_id)
        return [header + SLOT.pack(msg.slot)]
    if kind is Kind.ERROR:
        return [header + _error_bytes(msg.message)]
    if kind is Kind.COPY:
        _check_range(msg.src_slot, 0, MAX_ROWS, "src_slot", message_id)
        _check_range(msg.dst_slot, 0, MAX_ROWS, "dst_slot", message_id)
        _check_range(msg.length, 0, 2**32 - 1, "length", message_id)
        return [header + COPY_BODY.pack(msg.src_slot, msg.dst_slot, msg.length)]
    if kind is Kind.SHORT:
        _check_range(msg.stage, 0, MAX_STAGES, "stage", message_id)
        _check_u64(msg.free_bytes, "free_bytes")
        _check_u64(msg.needed_bytes, "needed_bytes")
        return [header + SHORT_BODY.pack(msg.stage, msg.free_bytes, msg.needed_bytes)]
    if kind in (Kind.TRAIN_FORWARD, Kind.TRAIN_BACKWARD):
        return _encode_train(header, msg)
    if kind is Kind.TRAIN_LOSS:
        _check_range(msg.micro, 0, MAX_ROWS, "micro", message_id)
        _check_range(msg.tokens, 0, 2**32 - 1, "tokens", message_id)
        return [header + LOSS_BODY.pack(msg.micro, _finite(msg.loss, "loss", message_id), msg.tokens)]
    if kind is Kind.TRAIN_STEP:
        _check_range(msg.micros, 0, MAX_ROWS, "micros", message_id)
        _check_range(msg.phase, 0, 1, "phase", message_id)
        return [header + STEP_BODY.pack(msg.micros, msg.phase, _finite(msg.value, "value", message_id),
                                        _finite(msg.lr, "lr", message_id))]
    return [header]


def _finite(value, name: str, message_id: int) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise FrameError(f"{name} must be a finite number, got {value!r}", message_id)
    return float(value)


def _encode_train(header: bytes, msg) -> list:
    """TRAIN_FORWARD / TRAIN_BACKWARD: ``TRAIN_BODY`` (micro, dtype, ndim, scale), the dims as
    u32, then (forward) the targets as int32 (B x T); frame 1: the tensor."""
    tensor = _wire_tensor(msg.tensor, msg.batch_id)
    _check_range(msg.micro, 0, MAX_ROWS, "micro", msg.batch_id)
    if tensor.ndim < 2:
        raise FrameError(f"a training tensor is (B, T, ...), got shape {tuple(tensor.shape)}", msg.batch_id)
    targets = b""
    scale = 0.0
    if isinstance(msg, TrainForward):
        scale = _finite(msg.scale, "scale", msg.batch_id)
        t = msg.targets
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(tensor.shape[:2]):
            raise FrameError(f"TrainForward.targets must be a tensor of shape {tuple(tensor.shape[:2])}", msg.batch_id)
        targets = bytes(_payload(_wire_tensor(t.to(torch.int32), msg.batch_id)))
    body = TRAIN_BODY.pack(msg.micro, _DTYPE_CODES[tensor.dtype], tensor.ndim, scale)
    dims = b"".join(DIM.pack(d) for d in tensor.shape)
    return [header + body + dims + targets, _payload(tensor)]


def msg_id(msg: Message) -> int:
    """The id a message carries in its header (a step id, or the message's own id)."""
    if isinstance(msg, TRAINING):
        return msg.batch_id
    return msg.step_id if isinstance(msg, (Forward, Sampled, Error, Short)) else msg.message_id


def _encode_forward(header: bytes, msg: Forward) -> list:
    tensor = _wire_tensor(msg.tensor, msg.step_id)
    if not isinstance(msg.rows, tuple) or not 1 <= len(msg.rows) <= MAX_ROWS or tensor.shape[0] != len(msg.rows):
        raise FrameError(f"Forward of step {msg.step_id} needs one Row per tensor row (1 to {MAX_ROWS}), "
                         f"got {len(msg.rows) if isinstance(msg.rows, tuple) else msg.rows!r} rows for a "
                         f"tensor of shape {tuple(tensor.shape)}", msg.step_id)
    rows = b"".join(_encode_row(row, msg.step_id) for row in msg.rows)
    stage_ms = _pack_ms(msg, msg.step_id)
    body = FORWARD_BODY.pack(len(msg.rows), _DTYPE_CODES[tensor.dtype], tensor.ndim, len(msg.stage_ms))
    dims = b"".join(DIM.pack(d) for d in tensor.shape)
    extras = b"".join(_encode_row_extra(row, msg.step_id) for row in msg.rows)
    rules = b"".join(_encode_rule(row.rule) for row in msg.rows if row.rule is not None)
    return [header + body + dims + rows + stage_ms + extras + rules, _payload(tensor)]


def _encode_row_extra(row: Row, step_id: int) -> bytes:
    _check_range(row.logprobs, -1, MAX_LOGPROBS, "logprobs", step_id)
    _check_range(row.embed, 0, len(EMBED_POOLINGS) - 1, "embed", step_id)
    rule = row.rule
    if rule is not None and not isinstance(rule, LogitRule):
        raise FrameError(f"Row.rule must be a LogitRule or None, got {type(rule).__name__}", step_id)
    allowed = 0 if rule is None or rule.allowed is None else len(rule.allowed)
    bias = 0 if rule is None else len(rule.bias)
    # a mask of 0 bytes (nothing allowed) and no mask differ: a present mask counts in the flag
    flag = 0 if rule is None else 1 if rule.allowed is None else 2
    _check_range(row.adapter, 0, MAX_ADAPTER, "adapter", step_id)
    return ROW_EXTRA.pack(row.logprobs, row.embed, flag, allowed, bias, row.adapter)


def _encode_rule(rule: LogitRule) -> bytes:
    return (rule.allowed or b"") + b"".join(BIAS.pack(token_id, bias) for token_id, bias in rule.bias)


def _encode_row(row: Row, step_id: int) -> bytes:
    if not isinstance(row, Row) or not isinstance(row.sampling, SamplingSettings):
        raise FrameError(f"Forward.rows must hold Rows with SamplingSettings, got {row!r}", step_id)
    s = row.sampling
    _check_range(row.slot, 0, MAX_ROWS, "slot", step_id)
    _check_range(row.position, 0, 2**32 - 1, "position", step_id)
    seed = 0 if s.seed is None else s.seed
    _check_range(seed, 0, MAX_SEED, "sampling.seed", step_id)
    if row.verify and (not row.sample or row.rule is not None or row.logprobs != -1 or row.embed):
        raise FrameError("a verify Row samples, with no rule, logprobs or embed", step_id)
    flags = (SAMPLE if row.sample else 0) | (VERIFY if row.verify else 0)
    return ROW.pack(row.slot, row.position, flags, float(s.temperature), float(s.top_p), int(s.top_k), seed)


def _encode_sampled(msg: Sampled) -> bytes:
    if not isinstance(msg.token_ids, tuple) or len(msg.token_ids) > MAX_ROWS:
        raise FrameError(f"Sampled.token_ids must be a tuple of at most {MAX_ROWS} ids", msg.step_id)
    for token_id in msg.token_ids:
        _check_range(token_id, 0, NO_TOKEN, "token_id", msg.step_id)
    stage_ms = _pack_ms(msg, msg.step_id)
    ids = struct.pack(f"<{len(msg.token_ids)}I", *msg.token_ids)
    logprobs = _encode_logprobs(msg)
    verified = _encode_verified(msg)
    vectors, hidden = _encode_vectors(msg)
    return (SAMPLED_BODY.pack(len(msg.token_ids), len(msg.stage_ms)) + ids + stage_ms
            + SAMPLED_EXTRA.pack(hidden, 1 if verified else 0) + logprobs + verified + vectors)


def _encode_verified(msg: Sampled) -> bytes:
    rows = len(msg.token_ids)
    if not isinstance(msg.verified, tuple) or len(msg.verified) not in (0, rows):
        raise FrameError(f"Sampled.verified must be () or one tuple per row ({rows})", msg.step_id)
    out = []
    for samples in msg.verified:
        if not isinstance(samples, tuple) or len(samples) > MAX_VERIFIED:
            raise FrameError(f"Sampled.verified rows must be tuples of at most {MAX_VERIFIED} ids", msg.step_id)
        for token_id in samples:
            _check_range(token_id, 0, NO_TOKEN - 1, "verified token_id", msg.step_id)
        out.append(struct.pack(f"<B{len(samples)}I", len(samples), *samples))
    return b"".join(out)


def _encode_logprobs(msg: Sampled) -> bytes:
    rows = len(msg.token_ids)
    if not isinstance(msg.logprobs, tuple) or len(msg.logprobs) not in (0, rows):
        raise FrameError(f"Sampled.logprobs must be () or one per row ({rows})", msg.step_id)
    out = []
    for entry in msg.logprobs or (None,) * rows:
        if entry is None:
            out.append(LOGPROB_COUNT.pack(NO_LOGPROB))
            continue
        if not isinstance(entry, TokenLogprob) or not isinstance(entry.top, tuple) or len(entry.top) > MAX_LOGPROBS:
            raise FrameError(f"Sampled.logprobs entries must be TokenLogprob with at most {MAX_LOGPROBS} "
                             f"alternatives, or None; got {entry!r}", msg.step_id)
        pairs = ((entry.token_id, entry.logprob), *entry.top)
        for token_id, logprob in pairs:
            _check_range(token_id, 0, NO_TOKEN - 1, "logprob token_id", msg.step_id)
            if not isinstance(logprob, float) or math.isnan(logprob) or logprob > 0.0:
                raise FrameError(f"a logprob must be a float <= 0, got {logprob!r}", msg.step_id)
        out.append(LOGPROB_COUNT.pack(len(entry.top)) + b"".join(LOGPROB.pack(*pair) for pair in pairs))
    return b"".join(out)


def _encode_vectors(msg: Sampled) -> tuple[bytes, int]:
    vectors = msg.vectors
    if vectors is None:
        return b"", 0
    rows = len(msg.token_ids)
    if (not isinstance(vectors, torch.Tensor) or vectors.dtype != torch.float32 or vectors.ndim != 2
            or vectors.shape[0] != rows or not 1 <= vectors.shape[1] <= 2**32 - 1):
        raise FrameError(f"Sampled.vectors must be a float32 tensor (rows={rows}, hidden), got "
                         f"{getattr(vectors, 'dtype', type(vectors).__name__)} "
                         f"{tuple(getattr(vectors, 'shape', ()))}", msg.step_id)
    if vectors.numel() * 4 > MAX_TENSOR_BYTES:
        raise FrameError(f"Sampled.vectors are over {MAX_TENSOR_BYTES} bytes", msg.step_id)
    return bytes(_payload(_wire_tensor(vectors, msg.step_id))), vectors.shape[1]


def _pack_ms(msg, message_id: int) -> bytes:
    if not isinstance(msg.stage_ms, tuple) or len(msg.stage_ms) > MAX_STAGES:
        raise FrameError(f"stage_ms must be a tuple of at most {MAX_STAGES} timings", message_id)
    try:
        return b"".join(MS.pack(ms) for ms in msg.stage_ms)
    except (struct.error, OverflowError, TypeError) as exc:
        raise FrameError(f"stage_ms must be float32 numbers of milliseconds: {exc}", message_id) from None


def _error_bytes(text: str) -> bytes:
    raw = str(text).encode("utf-8", "replace")
    return raw[:MAX_ERROR_BYTES].decode("utf-8", "ignore").encode()


def _check_u64(value, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_REQUEST_ID:
        raise FrameError(f"{name} must be an int in [0, 2**64), got {value!r}")


def _check_range(value, low: int, high: int, name: str, message_id: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise FrameError(f"{name} must be an int in [{low}, {high}], got {value!r}", message_id)


def _wire_tensor(tensor, message_id: int) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise FrameError(f"Forward.tensor must be a torch.Tensor, got {type(tensor).__name__}",
                         message_id)
    if tensor.dtype not in _DTYPE_CODES:
        names = ", ".join(str(d).removeprefix("torch.") for d in _DTYPE_CODES)
        raise FrameError(f"dtype {tensor.dtype} cannot travel on the data plane; convert the "
                         f"tensor to one of: {names}", message_id)
    if not 1 <= tensor.ndim <= MAX_NDIM:
        raise FrameError(f"tensor has {tensor.ndim} dims; the wire carries 1 to {MAX_NDIM}",
                         message_id)
    if tensor.layout != torch.strided:
        raise FrameError(f"{tensor.layout} tensors cannot travel; send tensor.to_dense()", message_id)
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
    kind, message_id = _unpack_header(header)
    body = header[HEADER.size:]
    if kind in (Kind.FORWARD, Kind.TRAIN_FORWARD, Kind.TRAIN_BACKWARD):
        if len(frames) != 2:
            raise FrameError(f"{kind.name} of step {message_id} has no payload frame", message_id)
        if kind is not Kind.FORWARD:
            return _decode_train(kind, message_id, body, _as_buffer(frames[1]))
        return _decode_forward(message_id, body, _as_buffer(frames[1]))
    if len(frames) != 1:
        raise FrameError(f"{kind.name} {message_id} carries a payload frame", message_id)
    if kind is Kind.SAMPLED:
        return _decode_sampled(message_id, body)
    if kind is Kind.ERROR:
        if len(body) > MAX_ERROR_BYTES:
            raise FrameError(f"ERROR text of step {message_id} is over {MAX_ERROR_BYTES} bytes", message_id)
        return Error(message_id, str(body, "utf-8", "replace"))
    if kind is Kind.FREE:
        if len(body) != SLOT.size:
            raise FrameError(f"FREE {message_id} has {len(body)} body bytes, not {SLOT.size}", message_id)
        return Free(message_id, SLOT.unpack_from(body)[0])
    if kind is Kind.COPY:
        if len(body) != COPY_BODY.size:
            raise FrameError(f"COPY {message_id} has {len(body)} body bytes, not {COPY_BODY.size}", message_id)
        return Copy(message_id, *COPY_BODY.unpack_from(body))
    if kind is Kind.SHORT:
        if len(body) != SHORT_BODY.size:
            raise FrameError(f"SHORT {message_id} has {len(body)} body bytes, not {SHORT_BODY.size}", message_id)
        stage, free_bytes, needed_bytes = SHORT_BODY.unpack_from(body)
        _check_range(stage, 0, MAX_STAGES, "stage", message_id)
        return Short(message_id, stage, free_bytes, needed_bytes)
    if kind is Kind.TRAIN_LOSS:
        if len(body) != LOSS_BODY.size:
            raise FrameError(f"TRAIN_LOSS {message_id} has {len(body)} body bytes, not {LOSS_BODY.size}", message_id)
        micro, loss, tokens = LOSS_BODY.unpack_from(body)
        return TrainLoss(message_id, micro, _finite(loss, "loss", message_id), tokens)
    if kind is Kind.TRAIN_STEP:
        if len(body) != STEP_BODY.size:
            raise FrameError(f"TRAIN_STEP {message_id} has {len(body)} body bytes, not {STEP_BODY.size}", message_id)
        micros, phase, value, lr = STEP_BODY.unpack_from(body)
        _check_range(phase, 0, 1, "phase", message_id)
        return TrainStep(message_id, micros, phase, _finite(value, "value", message_id), _finite(lr, "lr", message_id))
    if len(body):
        raise FrameError(f"{kind.name} {message_id} has {len(body)} stray bytes", message_id)
    return {Kind.PING: Ping, Kind.SHUTDOWN: Shutdown}[kind](message_id)


def _as_buffer(frame) -> memoryview:
    try:
        return memoryview(getattr(frame, "buffer", frame)).cast("B")
    except TypeError as exc:
        raise FrameError(f"a frame must be bytes-like, got {type(frame).__name__}") from exc


def _unpack_header(header: memoryview) -> tuple[Kind, int]:
    if len(header) < HEADER.size:
        raise FrameError(f"header is {len(header)} bytes, shorter than the {HEADER.size} of a "
                         "data-plane header: the sender is not an exo-lab stage")
    magic, version, code, message_id = HEADER.unpack_from(header)
    if magic != MAGIC:
        raise FrameError(f"bad magic {bytes(magic)!r}: the sender is not an exo-lab stage")
    if version != VERSION:
        raise FrameError(f"wire version {version}, this exo-lab speaks {VERSION}: run the same "
                         "exo-lab version on every PC", message_id)
    kind = _KINDS.get(code)
    if kind is None:
        raise FrameError(f"unknown message kind {code} for message {message_id}", message_id)
    return kind, message_id


def _decode_forward(step_id: int, body: memoryview, payload: memoryview) -> Forward:
    if len(body) < FORWARD_BODY.size:
        raise FrameError(f"FORWARD header of step {step_id} is truncated", step_id)
    count, dtype_code, ndim, stages = FORWARD_BODY.unpack_from(body)
    dtype = _CODE_DTYPES.get(dtype_code)
    if dtype is None or not 1 <= ndim <= MAX_NDIM or count < 1:
        raise FrameError(f"FORWARD of step {step_id}: dtype code {dtype_code} with {ndim} dims and "
                         f"{count} rows is not a batch this wire carries", step_id)
    rows_at = FORWARD_BODY.size + DIM.size * ndim
    ms_at = rows_at + ROW.size * count
    extras_at = ms_at + MS.size * stages
    rules_at = extras_at + ROW_EXTRA.size * count
    if len(body) < rules_at:
        raise FrameError(f"FORWARD header of step {step_id} is {len(body)} bytes, its fields need "
                         f"at least {rules_at}", step_id)
    shape = struct.unpack_from(f"<{ndim}I", body, FORWARD_BODY.size)
    if shape[0] != count:
        raise FrameError(f"FORWARD of step {step_id} has {count} rows but a tensor of {shape[0]}", step_id)
    extras = [ROW_EXTRA.unpack_from(body, extras_at + ROW_EXTRA.size * i) for i in range(count)]
    rules = _decode_rules(body, rules_at, extras, step_id)
    rows = tuple(_decode_row(body, rows_at + ROW.size * i, extra, rule, step_id)
                 for i, (extra, rule) in enumerate(zip(extras, rules)))
    stage_ms = struct.unpack_from(f"<{stages}f", body, ms_at)
    return Forward(step_id, rows, _tensor_from_payload(payload, dtype, shape, step_id), tuple(stage_ms))


def _decode_train(kind: Kind, batch_id: int, body: memoryview, payload: memoryview):
    if len(body) < TRAIN_BODY.size:
        raise FrameError(f"{kind.name} of batch {batch_id} is truncated", batch_id)
    micro, dtype_code, ndim, scale = TRAIN_BODY.unpack_from(body)
    dtype = _CODE_DTYPES.get(dtype_code)
    if dtype is None or not 2 <= ndim <= MAX_NDIM:
        raise FrameError(f"{kind.name} of batch {batch_id}: dtype code {dtype_code} with {ndim} dims is not "
                         "a training tensor", batch_id)
    dims_end = TRAIN_BODY.size + DIM.size * ndim
    if len(body) < dims_end:
        raise FrameError(f"{kind.name} of batch {batch_id} is truncated", batch_id)
    shape = struct.unpack_from(f"<{ndim}I", body, TRAIN_BODY.size)
    tensor = _tensor_from_payload(payload, dtype, shape, batch_id)
    if kind is Kind.TRAIN_BACKWARD:
        if len(body) != dims_end:
            raise FrameError(f"TRAIN_BACKWARD of batch {batch_id} has stray bytes", batch_id)
        return TrainBackward(batch_id, micro, tensor)
    targets = _tensor_from_payload(body[dims_end:], torch.int32, tuple(shape[:2]), batch_id)
    return TrainForward(batch_id, micro, tensor, targets, _finite(scale, "scale", batch_id))


def _decode_rules(body: memoryview, offset: int, extras: list[tuple], step_id: int) -> list[LogitRule | None]:
    """Each row's LogitRule from the rule section (bounded per row; the lengths must add up)."""
    from ..errors import RequestError

    rules = []
    for _, _, flag, allowed_bytes, bias_count, _ in extras:
        if flag > 2 or (flag != 2 and allowed_bytes) or allowed_bytes > MAX_ALLOWED_BYTES or allowed_bytes % 4 \
                or bias_count > MAX_RULE_BIAS or (flag == 0 and bias_count):
            raise FrameError(f"FORWARD of step {step_id}: a row's rule (flag {flag}, {allowed_bytes} mask bytes, "
                             f"{bias_count} bias entries) is not one this wire carries", step_id)
        if flag == 0:
            rules.append(None)
            continue
        end = offset + allowed_bytes + BIAS.size * bias_count
        if end > len(body):
            raise FrameError(f"FORWARD of step {step_id}: its rules are truncated", step_id)
        allowed = bytes(body[offset:offset + allowed_bytes]) if flag == 2 else None
        bias = tuple(BIAS.unpack_from(body, offset + allowed_bytes + BIAS.size * i) for i in range(bias_count))
        try:
            rules.append(LogitRule(allowed, bias))
        except RequestError as exc:
            raise FrameError(f"FORWARD of step {step_id}: {exc}", step_id) from None
        offset = end
    if offset != len(body):
        raise FrameError(f"FORWARD header of step {step_id} has {len(body) - offset} stray bytes", step_id)
    return rules


def _decode_row(body: memoryview, offset: int, extra: tuple, rule: LogitRule | None, step_id: int) -> Row:
    from ..errors import RequestError

    slot, position, flags, temperature, top_p, top_k, seed = ROW.unpack_from(body, offset)
    logprobs, embed = extra[0], extra[1]
    verify = bool(flags & VERIFY)
    if flags > SAMPLE | VERIFY or not -1 <= logprobs <= MAX_LOGPROBS or embed not in EMBED_POOLINGS or (
            verify and (not flags & SAMPLE or rule is not None or logprobs != -1 or embed)):
        raise FrameError(f"FORWARD of step {step_id}: unknown row flags {flags}, logprobs {logprobs} or "
                         f"embed {embed}", step_id)
    try:
        sampling = SamplingSettings(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    except RequestError as exc:
        raise FrameError(f"FORWARD of step {step_id}: {exc}", step_id) from None
    return Row(slot, position, sampling, bool(flags & SAMPLE), rule, logprobs, embed, verify, extra[5])


def _decode_sampled(step_id: int, body: memoryview) -> Sampled:
    if len(body) < SAMPLED_BODY.size:
        raise FrameError(f"SAMPLED of step {step_id} is truncated", step_id)
    count, stages = SAMPLED_BODY.unpack_from(body)
    extra_at = SAMPLED_BODY.size + 4 * count + MS.size * stages
    if len(body) < extra_at + SAMPLED_EXTRA.size + LOGPROB_COUNT.size * count:
        raise FrameError(f"SAMPLED of step {step_id} has the wrong length", step_id)
    token_ids = struct.unpack_from(f"<{count}I", body, SAMPLED_BODY.size)
    stage_ms = struct.unpack_from(f"<{stages}f", body, SAMPLED_BODY.size + 4 * count)
    hidden, has_verified = SAMPLED_EXTRA.unpack_from(body, extra_at)
    logprobs, offset = _decode_logprobs(body, extra_at + SAMPLED_EXTRA.size, count, step_id)
    verified = ()
    if has_verified > 1:
        raise FrameError(f"SAMPLED of step {step_id}: unknown verified flag {has_verified}", step_id)
    if has_verified:
        verified, offset = _decode_verified(body, offset, count, step_id)
    vectors = None
    if hidden:
        if count * hidden * 4 > MAX_TENSOR_BYTES:
            raise FrameError(f"SAMPLED of step {step_id} declares vectors over {MAX_TENSOR_BYTES} bytes", step_id)
        vectors = _tensor_from_payload(body[offset:], torch.float32, (count, hidden), step_id)
    elif offset != len(body):
        raise FrameError(f"SAMPLED of step {step_id} has {len(body) - offset} stray bytes", step_id)
    return Sampled(step_id, tuple(token_ids), tuple(stage_ms), logprobs, vectors, verified)


def _decode_verified(body: memoryview, offset: int, count: int, step_id: int):
    """(per row the verify samples, the offset after them)."""
    rows = []
    for _ in range(count):
        if offset + 1 > len(body):
            raise FrameError(f"SAMPLED of step {step_id}: its verify samples are truncated", step_id)
        size = body[offset]
        end = offset + 1 + 4 * size
        if size > MAX_VERIFIED or end > len(body):
            raise FrameError(f"SAMPLED of step {step_id}: a verify row of {size} samples is over {MAX_VERIFIED} "
                             "or truncated", step_id)
        samples = struct.unpack_from(f"<{size}I", body, offset + 1)
        if NO_TOKEN in samples:
            raise FrameError(f"SAMPLED of step {step_id}: a verify sample is not a token id", step_id)
        rows.append(tuple(samples))
        offset = end
    return tuple(rows), offset


def _decode_logprobs(body: memoryview, offset: int, count: int, step_id: int):
    """(one TokenLogprob or None per row, or () when none is set; the offset after them)."""
    entries = []
    for _ in range(count):
        if offset + LOGPROB_COUNT.size > len(body):
            raise FrameError(f"SAMPLED of step {step_id}: its logprobs are truncated", step_id)
        (top,) = LOGPROB_COUNT.unpack_from(body, offset)
        offset += LOGPROB_COUNT.size
        if top == NO_LOGPROB:
            entries.append(None)
            continue
        end = offset + LOGPROB.size * (top + 1)
        if top > MAX_LOGPROBS or end > len(body):
            raise FrameError(f"SAMPLED of step {step_id}: a logprob with {top} alternatives is not one this "
                             "wire carries, or is truncated", step_id)
        pairs = [LOGPROB.unpack_from(body, offset + LOGPROB.size * i) for i in range(top + 1)]
        if any(math.isnan(logprob) or logprob > 0.0 or token_id == NO_TOKEN for token_id, logprob in pairs):
            raise FrameError(f"SAMPLED of step {step_id}: a logprob is not a token id with a float <= 0", step_id)
        entries.append(TokenLogprob(pairs[0][0], pairs[0][1], tuple(pairs[1:])))
        offset = end
    return (tuple(entries) if any(entry is not None for entry in entries) else ()), offset


def _tensor_from_payload(payload: memoryview, dtype: torch.dtype, shape: tuple,
                         message_id: int) -> torch.Tensor:
    itemsize = _ITEMSIZES[dtype]
    if math.prod(max(d, 1) for d in shape) * itemsize > MAX_TENSOR_BYTES:
        raise FrameError(f"tensor of message {message_id} declares shape {list(shape)}: over "
                         f"{MAX_TENSOR_BYTES} bytes even where a dimension is 0", message_id)
    expected = math.prod(shape) * itemsize
    if len(payload) != expected:
        raise FrameError(f"payload of message {message_id} has {len(payload)} bytes, but shape "
                         f"{list(shape)} x {dtype} needs {expected}", message_id)
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
