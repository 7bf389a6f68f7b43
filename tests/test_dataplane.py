"""The data plane (:mod:`exo_lab.wire`): typed messages and their bytes, malformed and hostile
input, and real zmq sockets on loopback (127.0.0.1 only).

Sections: round trips, tensor memory, encode refusals, decode refusals, bounded decoding, sync
sockets, async sockets, the hop benchmark.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import socket
import struct
import threading
import time

import pytest
import torch
import zmq
import zmq.asyncio

from exo_lab.bench import measure_hop_overhead
from exo_lab.errors import ClusterError, ConfigError
from exo_lab.sampling import SamplingSettings, sample_token
from exo_lab.wire import (
    AsyncInbox, AsyncOutbox, Error, Forward, FrameError, Free, Inbox, Kind, Outbox, Ping,
    Shutdown, Token, decode, encode,
)
from exo_lab.wire.frames import (
    DIM, FORWARD_BODY, HEADER, MAGIC, MAX_ERROR_BYTES, MAX_STAGES, MS, TOKEN_BODY, VERSION,
)
from exo_lab.wire.sockets import MAX_MESSAGE_BYTES, tcp_address

torch.set_num_threads(1)

GREEDY = SamplingSettings()
SAMPLED = SamplingSettings(temperature=0.7, top_p=0.9, top_k=40, seed=1234)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32]
DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.int64: 4, torch.int32: 5}
SHAPES = [(7,), (3, 5), (1, 4, 896)]
MESSAGE_TYPES = (Forward, Token, Free, Error, Ping, Shutdown)
U32, U64 = 2**32 - 1, 2**64 - 1


def make_tensor(shape, dtype=torch.float32) -> torch.Tensor:
    values = torch.randn(shape) * 100
    return values.to(dtype) if dtype.is_floating_point else values.to(torch.int64).to(dtype)


def fwd(tensor, request_id=1, position=0, sampling=GREEDY, stage_ms=()) -> Forward:
    return Forward(request_id, position, tensor, sampling, tuple(stage_ms))


def round_trip(msg):
    return decode([bytes(frame) for frame in encode(msg)])


def as_f32(values) -> tuple[float, ...]:
    return struct.unpack(f"<{len(values)}f", struct.pack(f"<{len(values)}f", *values))


def on_the_wire(sampling: SamplingSettings) -> SamplingSettings:
    """What a receiver gets: the wire has no "no seed", so None travels as 0 (which
    sample_token treats alike)."""
    return SamplingSettings(temperature=sampling.temperature, top_p=sampling.top_p,
                            top_k=sampling.top_k, seed=sampling.seed or 0)


def assert_same(received, sent) -> None:
    assert type(received) is type(sent)
    if not isinstance(sent, Forward):
        assert received == dataclasses.replace(sent, **_f32_ms(sent))
        return
    assert (received.request_id, received.position, received.stage_ms) == \
        (sent.request_id, sent.position, as_f32(sent.stage_ms))
    assert received.sampling == on_the_wire(sent.sampling)
    assert received.tensor.dtype == sent.tensor.dtype
    assert received.tensor.shape == sent.tensor.shape
    assert received.tensor.device.type == "cpu"
    assert torch.equal(received.tensor, sent.tensor.detach().cpu())


def _f32_ms(msg) -> dict:
    return {"stage_ms": as_f32(msg.stage_ms)} if isinstance(msg, Token) else {}


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------------ round trips

ROUND_TRIPS = {
    "forward-minimal": fwd(torch.tensor([[1, 2, 3]])),
    "forward-full": fwd(make_tensor((1, 2, 8)), request_id=U64, position=U32,
                        sampling=SamplingSettings(temperature=2.0, top_p=0.5, top_k=U32, seed=U64),
                        stage_ms=(1.5, 0.25, 1e-3)),
    "forward-id-0-seed-0": fwd(torch.tensor([5]), request_id=0,
                               sampling=SamplingSettings(temperature=1.0, seed=0)),
    "forward-seed-none": fwd(torch.tensor([5]), sampling=SamplingSettings(temperature=1.0)),
    "forward-max-stages": fwd(torch.tensor([5]), stage_ms=[float(i) for i in range(MAX_STAGES)]),
    "token-minimal": Token(0, 0),
    "token-full": Token(U64, U32, (1.5, 2.25, 0.0, 0.1)),
    "token-max-stages": Token(3, 7, tuple(float(i) for i in range(MAX_STAGES))),
    "free-0": Free(0),
    "free-max": Free(U64),
    "error": Error(3, "stage 1 ran out of memory"),
    "error-empty": Error(U64, ""),
    "error-unicode": Error(0, "ü ∑ 日本 🎉"),
    "ping-0": Ping(0),
    "ping-max": Ping(U64),
    "shutdown-default": Shutdown(),
    "shutdown-id": Shutdown(U64),
}


@pytest.mark.parametrize("msg", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_every_message_type_round_trips(msg):
    frames = encode(msg)
    assert len(frames) == (2 if isinstance(msg, Forward) else 1)
    assert_same(round_trip(msg), msg)


@pytest.mark.parametrize("sampling", [
    SamplingSettings(),
    SamplingSettings(temperature=1e-5, top_p=1e-9, top_k=1, seed=1),
    SamplingSettings(temperature=0.7, top_p=0.9, top_k=50, seed=2**63),
    SamplingSettings(temperature=2, top_p=1, top_k=U32, seed=U64),   # ints are numbers too
    SamplingSettings(temperature=-0.0, top_p=0.3333333333333333),
], ids=["defaults", "tiny", "typical", "max", "odd-floats"])
def test_sampling_settings_travel_exactly(sampling):
    received = round_trip(fwd(torch.tensor([1]), sampling=sampling)).sampling
    assert received == on_the_wire(sampling)
    assert isinstance(received.top_k, int) and isinstance(received.seed, int)


def test_seed_none_travels_as_zero_and_samples_the_same_tokens():
    unseeded = SamplingSettings(temperature=1.0)
    received = round_trip(fwd(torch.tensor([1]), sampling=unseeded)).sampling
    assert received.seed == 0
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    for position in range(5):
        assert sample_token(logits, received, position) == sample_token(logits, unseeded, position)


def test_stage_ms_travel_as_float32():
    received = round_trip(Token(1, 2, (0.1, 1e30, float("inf")))).stage_ms
    assert received == as_f32((0.1, 1e30, float("inf"))) and received[0] != 0.1
    assert math.isnan(round_trip(Token(1, 2, (float("nan"),))).stage_ms[0])


def test_kind_codes_and_byte_layout_are_stable():
    # other PCs may run another build: the wire codes and sizes must never move
    assert {kind.name: kind.value for kind in Kind} == {
        "FORWARD": 1, "TOKEN": 2, "FREE": 3, "ERROR": 4, "PING": 5, "SHUTDOWN": 7}
    assert (HEADER.size, FORWARD_BODY.size, TOKEN_BODY.size, DIM.size, MS.size) == (12, 35, 5, 4, 4)
    assert encode(Ping(0x0102030405060708)) == [b"EX\x02\x05\x08\x07\x06\x05\x04\x03\x02\x01"]
    assert encode(Free(1)) == [b"EX\x02\x03" + (1).to_bytes(8, "little")]
    assert encode(Token(1, 258, (1.0,))) == [
        b"EX\x02\x02" + (1).to_bytes(8, "little") + b"\x02\x01\x00\x00\x01" + struct.pack("<f", 1.0)]
    assert encode(Error(1, "ü")) == [b"EX\x02\x04" + (1).to_bytes(8, "little") + "ü".encode()]
    msg = fwd(torch.ones(2, 3), request_id=42, position=1, stage_ms=(0.5,))
    header, payload = encode(msg)
    assert bytes(header) == forward_header(stage_ms=(0.5,))
    assert bytes(payload) == struct.pack("<6f", *[1.0] * 6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_dtype_and_shape_round_trips_bit_exact(dtype, shape):
    msg = fwd(make_tensor(shape, dtype), request_id=17, position=4)
    header, payload = encode(msg)
    assert len(payload) == math.prod(shape) * msg.tensor.element_size()   # raw bytes only
    # the dtype codes are part of the wire format: append, never renumber
    assert bytes(header) == forward_header(shape=shape, dtype_code=DTYPE_CODES[dtype],
                                           request_id=17, position=4)
    assert_same(round_trip(msg), msg)


def test_bfloat16_bytes_travel_unchanged():
    # bfloat16 has no numpy dtype; the wire must carry its exact bit patterns
    values = torch.tensor([1.0, -2.5, 3.0e38, float("inf"), float("-inf"), 1e-40, -0.0],
                          dtype=torch.bfloat16)
    received = round_trip(fwd(values)).tensor
    assert received.dtype is torch.bfloat16
    assert torch.equal(received.view(torch.int16), values.view(torch.int16))


@pytest.mark.parametrize("shape", [(0,), (0, 896), (1, 0, 896), (3, 4, 0)], ids=str)
def test_empty_tensors_round_trip(shape):
    msg = fwd(torch.zeros(shape))
    assert bytes(encode(msg)[1]) == b""
    assert_same(round_trip(msg), msg)


def test_non_contiguous_input_round_trips_and_is_left_untouched():
    base = torch.randn(6, 8)
    for view in (base.t(), base[::2, 1::3], base.to(torch.bfloat16).t()[1:],
                 torch.arange(24, dtype=torch.int32).reshape(2, 3, 4).permute(2, 0, 1)):
        assert not view.is_contiguous()
        before = view.clone()
        assert_same(round_trip(fwd(view)), fwd(before))
        assert torch.equal(view, before) and not view.is_contiguous()


def test_contiguous_tensor_with_odd_strides_round_trips():
    # torch calls size-1 dims contiguous whatever their stride
    odd = torch.empty_strided((1, 3, 1), (100, 1, 7)).copy_(torch.arange(3.0).reshape(1, 3, 1))
    assert odd.is_contiguous()
    assert_same(round_trip(fwd(odd)), fwd(odd))


def test_grad_tracking_tensors_round_trip_detached():
    leaf = torch.randn(2, 3, requires_grad=True)
    for tracked in (leaf, leaf * 2, torch.nn.Parameter(torch.randn(4))):
        received = round_trip(fwd(tracked)).tensor
        assert not received.requires_grad and torch.equal(received, tracked.detach())
    assert leaf.requires_grad


def test_one_megabyte_prefill_round_trips():
    prefill = torch.randn(1, 300, 896)   # 1.07 MB of activations
    msg = fwd(prefill, request_id=2, stage_ms=(3.5,))
    assert len(encode(msg)[1]) == prefill.nbytes
    assert_same(round_trip(msg), msg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_tensor_is_moved_to_cpu_on_encode():
    sent = torch.randn(1, 3, 896, device="cuda", dtype=torch.bfloat16)
    received = round_trip(fwd(sent)).tensor
    assert received.device.type == "cpu" and torch.equal(received, sent.cpu())


# ------------------------------------------------------------------------ tensor memory

@pytest.mark.parametrize("as_frame", [
    bytes, bytearray, memoryview, lambda raw: memoryview(bytearray(raw)), zmq.Frame,
], ids=["bytes", "bytearray", "memoryview-of-bytes", "memoryview-of-bytearray", "zmq.Frame"])
def test_decoded_tensor_is_writable_and_never_writes_into_immutable_bytes(as_frame):
    sent = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    header, payload = encode(fwd(sent))
    raw = bytes(payload)
    received = decode([header, as_frame(raw)]).tensor
    received += 1   # a stage may update activations in place
    assert torch.equal(received, sent + 1)
    assert raw == struct.pack("<12f", *range(12))   # bytes are immutable: torch wrote a copy


def test_writable_buffer_is_shared_not_copied():
    header, payload = encode(fwd(torch.arange(4.0)))
    backing = bytearray(payload)
    received = decode([header, backing]).tensor
    received[0] = 9.0
    assert backing[:4] == struct.pack("<f", 9.0)


def test_unaligned_payload_decodes_to_an_aligned_tensor():
    sent = torch.arange(6, dtype=torch.int64)
    header, payload = encode(fwd(sent))
    backing = bytearray(1 + len(payload))
    shifted = memoryview(backing)[1:]   # libzmq may hand out odd offsets
    shifted[:] = payload
    assert torch.frombuffer(shifted, dtype=torch.uint8).data_ptr() % 8   # really unaligned
    received = decode([header, shifted]).tensor
    assert received.data_ptr() % 8 == 0 and torch.equal(received, sent)
    received[0] = 99
    assert bytes(shifted) == bytes(payload)   # the copy is the tensor's own


def test_aligned_zmq_frame_is_shared_not_copied():
    header, payload = encode(fwd(torch.arange(4.0)))
    frame = zmq.Frame(bytes(payload))   # small: zmq copies it into a message it owns
    received = decode([header, frame]).tensor
    if received.data_ptr() % 4:
        pytest.skip("zmq placed this frame unaligned, so decode had to copy")
    received[0] = 9.0
    assert bytes(frame.buffer[:4]) == struct.pack("<f", 9.0)


def test_payload_is_a_view_not_a_copy():
    tensor = torch.zeros(4)
    payload = encode(fwd(tensor))[1]
    tensor[0] = 1.0
    assert bytes(payload[:4]) == struct.pack("<f", 1.0)


# ------------------------------------------------------------------------ encode refusals

def with_seed(seed) -> SamplingSettings:
    """Settings holding a seed SamplingSettings itself would refuse (a buggy caller)."""
    settings = SamplingSettings(seed=1)
    object.__setattr__(settings, "seed", seed)
    return settings


@pytest.mark.parametrize("make, message", [
    (lambda: object(), "cannot send a object; send one of Forward, Token"),
    (lambda: "PING", "cannot send a str"),
    (lambda: Kind.PING, "cannot send a Kind"),
    (lambda: Ping(-1), r"request_id must be an int in \[0, 2\*\*64\), got -1"),
    (lambda: Ping(2**64), "request_id must be an int"),
    (lambda: Free(True), "got True"),
    (lambda: Token(1.0, 2), "request_id must be an int"),
    (lambda: fwd(torch.ones(1), request_id=-1), "request_id"),
    (lambda: fwd([1, 2, 3]), "Forward.tensor must be a torch.Tensor, got list"),
    (lambda: fwd(torch.zeros(2, dtype=torch.complex64)), "complex64 cannot travel"),
    (lambda: fwd(torch.zeros(2, dtype=torch.float64)), "float64 cannot travel"),
    (lambda: fwd(torch.zeros(2, dtype=torch.bool)), "bool cannot travel"),
    (lambda: fwd(torch.tensor(1.0)), "tensor has 0 dims; the wire carries 1 to 3"),
    (lambda: fwd(torch.zeros(1, 1, 1, 1)), "tensor has 4 dims"),
    (lambda: fwd(torch.eye(2).to_sparse()), "to_dense"),
    (lambda: fwd(torch.ones(1), position=-1), r"position must be an int in \[0, 4294967295\]"),
    (lambda: fwd(torch.ones(1), position=2**32), "position"),
    (lambda: fwd(torch.ones(1), position=1.0), "position"),
    (lambda: Token(1, -1), "token_id"),
    (lambda: Token(1, 2**32), "token_id"),
    (lambda: fwd(torch.ones(1), sampling=with_seed(-1)), "sampling.seed"),
    (lambda: fwd(torch.ones(1), sampling=with_seed(2**64)), "sampling.seed"),
], ids=["object", "str", "kind", "id-negative", "id-too-big", "id-bool", "id-float",
        "forward-id", "tensor-type", "complex", "float64", "bool", "0-dims", "4-dims", "sparse",
        "position-negative", "position-too-big", "position-float", "token-negative",
        "token-too-big", "seed-negative", "seed-too-big"])
def test_encode_rejects_what_the_wire_cannot_carry(make, message):
    with pytest.raises(FrameError, match=message):
        encode(make())


def test_encode_errors_carry_a_valid_request_id():
    with pytest.raises(FrameError) as info:
        encode(fwd(torch.ones(1), request_id=7, position=-1))
    assert info.value.request_id == 7
    assert isinstance(info.value, ClusterError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("msg", [Token(1, 2, (0.0,) * (MAX_STAGES + 1)),
                                 fwd(torch.ones(1), stage_ms=(0.0,) * (MAX_STAGES + 1))],
                         ids=["token", "forward"])
def test_too_many_stage_timings_is_a_frame_error(msg):
    with pytest.raises(FrameError, match="at most 255"):
        encode(msg)


@pytest.mark.parametrize("stage_ms", [(1e40,), ("1.5",), (None,)], ids=["over-f32", "str", "none"])
def test_stage_timings_the_wire_cannot_carry_are_a_frame_error(stage_ms):
    with pytest.raises(FrameError):
        encode(Token(1, 2, stage_ms))


@pytest.mark.parametrize("sampling", [None, {"temperature": 0.0}], ids=["none", "dict"])
def test_forward_without_sampling_settings_is_a_frame_error(sampling):
    with pytest.raises(FrameError):
        encode(fwd(torch.ones(1), sampling=sampling))


def test_long_error_text_is_truncated_to_valid_utf8():
    assert round_trip(Error(1, "x" * 5000)).message == "x" * MAX_ERROR_BYTES
    for char in ("€", "🎉", "ü"):          # 3, 4 and 2 UTF-8 bytes: cuts land mid-character
        (frame,) = encode(Error(1, char * 3000))
        body = bytes(frame[HEADER.size:])
        assert MAX_ERROR_BYTES - 4 < len(body) <= MAX_ERROR_BYTES
        assert body.decode("utf-8") == char * (len(body) // len(char.encode()))   # strict decode
        assert round_trip(Error(1, char * 3000)).message == body.decode()


def test_unencodable_error_text_is_replaced_not_refused():
    assert round_trip(Error(1, "bad \ud800 surrogate")).message == "bad ? surrogate"
    assert round_trip(Error(1, ValueError("not a str"))).message == "not a str"


# ------------------------------------------------------------------------ decode refusals

def header(kind=Kind.FORWARD, request_id=42, *, magic=MAGIC, version=VERSION) -> bytes:
    return HEADER.pack(magic, version, kind, request_id)


def forward_header(*, shape=(2, 3), dtype_code=1, ndim=None, stage_ms=(), stages=None,
                   position=1, temperature=0.0, top_p=1.0, top_k=0, seed=0, **head) -> bytes:
    """A FORWARD header frame built by hand from the documented layout (42, float32 (2, 3))."""
    ndim = len(shape) if ndim is None else ndim
    stages = len(stage_ms) if stages is None else stages
    return (header(Kind.FORWARD, **head)
            + FORWARD_BODY.pack(position, temperature, top_p, top_k, seed, dtype_code, ndim, stages)
            + b"".join(DIM.pack(d) for d in shape) + b"".join(MS.pack(ms) for ms in stage_ms))


def good_forward(**fields) -> list[bytes]:
    return [forward_header(**fields), bytes(24)]


def token_frame(token_id=5, stage_ms=(), stages=None) -> bytes:
    stages = len(stage_ms) if stages is None else stages
    return header(Kind.TOKEN) + TOKEN_BODY.pack(token_id, stages) + b"".join(MS.pack(m) for m in stage_ms)


def test_hand_built_frames_decode():
    assert_same(decode(good_forward(stage_ms=(2.0,))),
                fwd(torch.zeros(2, 3), request_id=42, position=1, stage_ms=(2.0,)))
    assert decode([token_frame(stage_ms=(1.0, 2.0))]) == Token(42, 5, (1.0, 2.0))


MALFORMED = {   # id: (frames, message regex, request_id the error carries)
    "no-frames": ([], "1 or 2 frames, got 0", None),
    "three-frames": (good_forward() + [b""], "1 or 2 frames, got 3", None),
    "not-a-list": (b"".join(good_forward()), "1 or 2 frames, got bytes", None),
    "frame-type": ([12345, b""], "bytes-like, got int", None),
    "frame-str": (["EX"], "bytes-like, got str", None),
    "bad-magic": ([b"XX" + forward_header()[2:], bytes(24)], "bad magic b'XX'", None),
    "json-magic": ([b'{"kind": 1}' + bytes(8)], "bad magic", None),
    "newer-version": ([forward_header(version=VERSION + 1), bytes(24)], "wire version 3", 42),
    "old-version": ([forward_header(version=1), bytes(24)], "run the same exo-lab version", 42),
    "kind-0": ([header(0)], "unknown message kind 0 for request 42", 42),
    "kind-6": ([header(6)], "unknown message kind 6", 42),
    "kind-255": ([header(255)], "unknown message kind 255", 42),
    "empty-header": ([b""], "header is 0 bytes", None),
    "short-header": ([header(Kind.PING)[:-1]], "header is 11 bytes, shorter than the 12", None),
    "short-forward-body": ([forward_header()[:HEADER.size + FORWARD_BODY.size - 1], bytes(24)],
                           "FORWARD header of request 42 is truncated", 42),
    "short-dims": ([forward_header()[:-1], bytes(24)], "is 42 bytes, its fields need 43", 42),
    "missing-stage-ms": ([forward_header(stages=2), bytes(24)], "is 43 bytes, its fields need 51", 42),
    "extra-header-bytes": ([forward_header() + b"\0", bytes(24)], "is 44 bytes, its fields need 43", 42),
    "short-token": ([header(Kind.TOKEN) + b"\0" * 4], "TOKEN of request 42 is truncated", 42),
    "token-ms-missing": ([token_frame(stages=1)], "wrong length", 42),
    "token-ms-extra": ([token_frame() + b"\0"], "wrong length", 42),
    "free-stray": ([header(Kind.FREE) + b"\0"], "FREE for request 42 has 1 stray bytes", 42),
    "ping-stray": ([header(Kind.PING) + b"ab"], "PING for request 42 has 2 stray", 42),
    "shutdown-stray": ([header(Kind.SHUTDOWN) + b"x"], "SHUTDOWN .* stray", 42),
    "forward-no-payload": ([forward_header()], "FORWARD for request 42 has no payload frame", 42),
    "ping-payload": ([header(Kind.PING), b""], "PING for request 42 carries a payload frame", 42),
    "token-payload": ([token_frame(), b"\0" * 8], "TOKEN .* carries a payload frame", 42),
    "error-payload": ([header(Kind.ERROR) + b"boom", b"x"], "ERROR .* carries a payload", 42),
    "payload-short": (good_forward()[:1] + [bytes(23)],
                      r"has 23 bytes, but shape \[2, 3\] x torch.float32 needs 24", 42),
    "payload-long": (good_forward()[:1] + [bytes(28)], "has 28 bytes", 42),
    "payload-empty": (good_forward()[:1] + [b""], "has 0 bytes", 42),
    "payload-dtype": ([forward_header(dtype_code=4), bytes(24)], "torch.int64 needs 48", 42),
    "payload-huge-shape": ([forward_header(shape=(U32, U32, U32)), bytes(24)], "over 268435456 bytes", 42),
    "ndim-0": ([forward_header(shape=(), ndim=0), bytes(4)], "with 0 dims is not a tensor", 42),
    "ndim-4": ([forward_header(shape=(1, 1, 2, 3)), bytes(24)], "with 4 dims", 42),
    "ndim-255": ([forward_header(shape=(), ndim=255), bytes(24)], "with 255 dims", 42),
    "dtype-0": ([forward_header(dtype_code=0), bytes(24)], "dtype code 0", 42),
    "dtype-6": ([forward_header(dtype_code=6), bytes(24)], "dtype code 6", 42),
    "dtype-200": ([forward_header(dtype_code=200), bytes(24)], "dtype code 200", 42),
    "error-too-long": ([header(Kind.ERROR) + b"x" * (MAX_ERROR_BYTES + 1)],
                       "ERROR text of request 42 is over 2048 bytes", 42),
    "temperature-nan": (good_forward(temperature=math.nan), "FORWARD of request 42: temperature", 42),
    "temperature-inf": (good_forward(temperature=math.inf), "temperature", 42),
    "temperature-5": (good_forward(temperature=5.0), "temperature must be a number between 0 and 2", 42),
    "temperature-negative": (good_forward(temperature=-1e-9), "temperature", 42),
    "top-p-0": (good_forward(top_p=0.0), r"top_p must be in \(0, 1\]", 42),
    "top-p-negative": (good_forward(top_p=-0.5), "top_p", 42),
    "top-p-over-1": (good_forward(top_p=1.5), "top_p", 42),
    "top-p-nan": (good_forward(top_p=math.nan), "top_p", 42),
}


@pytest.mark.parametrize("frames, message, request_id", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_frames_are_rejected_with_a_clear_error(frames, message, request_id):
    with pytest.raises(FrameError, match=message) as info:
        decode(frames)
    assert info.value.request_id == request_id
    assert isinstance(info.value, ClusterError) and isinstance(info.value, ValueError)


def test_error_text_of_exactly_the_limit_decodes_and_bad_utf8_is_replaced():
    assert decode([header(Kind.ERROR) + b"x" * MAX_ERROR_BYTES]).message == "x" * MAX_ERROR_BYTES
    assert decode([header(Kind.ERROR) + b"a\xffb"]).message == "a\ufffdb"


@pytest.mark.parametrize("shape", [(0, U32, U32), (0, 2**32 - 1, 2**31 + 3)], ids=str)
def test_empty_tensor_with_overflowing_dims_is_a_frame_error(shape):
    with pytest.raises(FrameError):
        decode([forward_header(shape=shape), b""])


# ------------------------------------------------------------------------ bounded decoding

def assert_decodes_or_frame_error(frames) -> None:
    """Decoding hostile bytes either fails with FrameError or yields a message that is valid
    enough to encode again: any other exception is a bug."""
    try:
        msg = decode(frames)
    except FrameError:
        return
    assert isinstance(msg, MESSAGE_TYPES) and 0 <= msg.request_id <= U64
    if isinstance(msg, Forward):
        assert msg.tensor.dtype in DTYPES and 1 <= msg.tensor.ndim <= 3
        assert isinstance(msg.sampling, SamplingSettings)
    assert type(round_trip(msg)) is type(msg)


def valid_encodings() -> list[list[bytes]]:
    msgs = list(ROUND_TRIPS.values()) + [
        fwd(make_tensor((1, 3, 4), dtype), sampling=SAMPLED, stage_ms=(1.0, 2.0)) for dtype in DTYPES]
    msgs += [fwd(torch.zeros(0, 4)), fwd(torch.zeros(1, 0, 4)), Error(9, "x" * MAX_ERROR_BYTES)]
    return [[bytes(frame) for frame in encode(msg)] for msg in msgs]


def test_random_garbage_decodes_or_raises_frame_error():
    rng = random.Random(20240601)
    prefixes = [b"", MAGIC, MAGIC + bytes([VERSION])] + [header(kind)[:4] for kind in Kind]
    for _ in range(2000):
        head = rng.choice(prefixes) + rng.randbytes(rng.randrange(0, 120))
        frames = [head] + [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.choice((0, 1, 1, 2)))]
        assert_decodes_or_frame_error(frames)


def test_single_byte_mutations_decode_or_raise_frame_error():
    rng = random.Random(7)
    encodings = valid_encodings()
    for _ in range(3000):
        frames = [bytearray(frame) for frame in rng.choice(encodings)]
        index = rng.randrange(len(frames)) if len(frames[-1]) else 0
        frame = frames[index]
        frame[rng.randrange(len(frame))] = rng.randrange(256)
        assert_decodes_or_frame_error([bytes(f) for f in frames])


def test_every_truncation_and_extension_decodes_or_raises_frame_error():
    for frames in valid_encodings():
        head = frames[0]
        for cut in range(len(head)):
            assert_decodes_or_frame_error([head[:cut], *frames[1:]])
        assert_decodes_or_frame_error([head + b"\0", *frames[1:]])
        assert_decodes_or_frame_error([head])
        assert_decodes_or_frame_error([head, b"\0" * 4])


def test_random_forward_fields_decode_or_raise_frame_error():
    rng = random.Random(99)
    floats = [0.0, -0.0, 1e-300, 1e-5, 0.5, 1.0, 2.0, 2.0000001, 5.0, -1.0, math.inf, -math.inf,
              math.nan, 5e-324]
    dims = [0, 1, 2, 3, 896, 2**16, 2**31, U32]
    for _ in range(2000):
        ndim = rng.choice((0, 1, 2, 3, 3, 4))
        shape = tuple(rng.choice(dims) for _ in range(ndim))
        code = rng.choice((0, 1, 2, 3, 4, 5, 6, 255))
        numel = math.prod(shape) if ndim else 0
        size = numel * {1: 4, 2: 2, 3: 2, 4: 8, 5: 4}.get(code, 1)
        payload = bytes(size) if size <= 4096 and rng.random() < 0.7 else rng.randbytes(rng.randrange(64))
        head = forward_header(shape=shape, dtype_code=code, position=rng.choice((0, U32)),
                              temperature=rng.choice(floats), top_p=rng.choice(floats),
                              top_k=rng.choice((0, U32)), seed=rng.choice((0, U64)),
                              stage_ms=[rng.choice(floats) for _ in range(rng.choice((0, 1, 3)))],
                              request_id=rng.choice((0, U64)))
        assert_decodes_or_frame_error([head, payload])


@pytest.mark.parametrize("size", [2048, 2049])
def test_bracket_flood_is_a_frame_error_not_a_recursion(size):
    # the old JSON meta could be made to recurse with b"[[[[..."; typed fields cannot
    flood = b"[" * size
    for frames in ([flood], [flood, flood], [header(Kind.FORWARD) + flood, flood],
                   [forward_header(), flood], *([header(kind) + flood] for kind in Kind)):
        if frames[0] == header(Kind.ERROR) + flood and size <= MAX_ERROR_BYTES:
            assert decode(frames) == Error(42, "[" * size)
            continue
        with pytest.raises(FrameError):
            decode(frames)


def test_one_mebibyte_garbage_header_is_a_frame_error():
    garbage = random.Random(3).randbytes(2**20)
    for frames in ([garbage], [garbage, garbage], *([header(kind) + garbage] for kind in Kind),
                   [header(Kind.FORWARD) + garbage, garbage], [forward_header(), garbage]):
        with pytest.raises(FrameError):
            decode(frames)


# ------------------------------------------------------------------------ sync sockets

def test_inbox_binds_an_os_chosen_port_and_reports_a_connectable_address(context):
    with Inbox(context) as inbox, Outbox(context, inbox.address) as outbox:
        assert inbox.port > 0 and inbox.address == f"tcp://127.0.0.1:{inbox.port}"
        outbox.send(Ping(1))
        assert inbox.recv(timeout_ms=5000) == Ping(1)


def test_inbox_on_every_interface_advertises_the_given_host(context):
    with Inbox(context, host="0.0.0.0", advertise_host="127.0.0.1") as inbox:
        assert inbox.address == tcp_address("127.0.0.1", inbox.port)
        with Outbox(context, inbox.address) as outbox:
            outbox.send(Token(4, 11))
            assert inbox.recv(timeout_ms=5000) == Token(4, 11)


def test_tcp_address_brackets_ipv6_literals():
    assert tcp_address("127.0.0.1", 5) == "tcp://127.0.0.1:5"
    assert tcp_address("pc-2.local", "*") == "tcp://pc-2.local:*"
    assert tcp_address("::1", 5) == "tcp://[::1]:5"


def ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback_works(), reason="no IPv6 loopback here")
def test_ipv6_hosts_are_bracketed_and_work(context):
    with Inbox(context, host="::1") as inbox, Outbox(context, inbox.address) as outbox:
        assert inbox.address == f"tcp://[::1]:{inbox.port}"
        outbox.send(Ping(6))
        assert inbox.recv(timeout_ms=5000) == Ping(6)


@pytest.mark.parametrize("host", ["0.0.0.0", "*", "::", ""])
def test_wildcard_bind_without_advertised_host_is_a_config_error(context, host):
    with pytest.raises(ConfigError, match="advertise_host"):
        Inbox(context, host=host)


def test_given_port_is_used_and_a_busy_port_is_a_cluster_error(context):
    port = free_port()
    with Inbox(context, port=port) as inbox:
        assert inbox.address == f"tcp://127.0.0.1:{port}"
        with pytest.raises(ClusterError, match=f"cannot bind .* on 127.0.0.1:{port}"):
            Inbox(context, port=port)


def test_outbox_may_connect_before_the_inbox_binds(context):
    # stages start in any order; the first send waits for the connection
    port = free_port()
    with Outbox(context, tcp_address("127.0.0.1", port), send_timeout_ms=5000) as outbox:
        with Inbox(context, port=port) as inbox:
            outbox.send(fwd(torch.ones(3)))
            assert torch.equal(inbox.recv(timeout_ms=5000).tensor, torch.ones(3))


def test_send_to_nobody_times_out_with_a_cluster_error(context):
    address = tcp_address("127.0.0.1", free_port())
    with Outbox(context, address, send_timeout_ms=100) as outbox:
        with pytest.raises(ClusterError, match=f"no stage took a message at {address} within 100"):
            outbox.send(Ping(1))


@pytest.mark.parametrize("address", ["127.0.0.1:5555", "tcp://127.0.0.1", "nonsense"])
def test_bad_outbox_address_is_a_cluster_error(context, address):
    with pytest.raises(ClusterError, match="expected tcp://host:port"):
        Outbox(context, address)


def test_unsendable_message_is_a_frame_error_before_anything_is_sent(context):
    with Inbox(context) as inbox, Outbox(context, inbox.address) as outbox:
        with pytest.raises(FrameError):
            outbox.send(fwd(torch.zeros(2, dtype=torch.float64)))
        outbox.send(Ping(2))
        assert inbox.recv(timeout_ms=5000) == Ping(2)


def test_recv_timeout_returns_none(context):
    with Inbox(context) as inbox:
        assert inbox.recv(timeout_ms=0) is None
        start = time.monotonic()
        assert inbox.recv(timeout_ms=50) is None
        assert time.monotonic() - start >= 0.04
        with Outbox(context, inbox.address) as outbox:
            outbox.send(Ping(1))
            assert inbox.recv(timeout_ms=5000) == Ping(1)
        assert inbox.recv(timeout_ms=10) is None


def test_order_is_preserved_across_kinds_and_interleaved_requests(context):
    sent = []
    for step in range(200):
        request_id = step % 3
        sent.append(fwd(torch.full((1, 1, 8), float(step)), request_id=request_id, position=step,
                        sampling=SAMPLED, stage_ms=(0.5,) * (step % 4)))
        sent.append(Token(request_id, step, (1.0, 2.0)))
        if step % 50 == 49:
            sent += [Free(request_id), Error(request_id, f"step {step}"), Ping(step)]
    sent.append(fwd(torch.randn(1, 300, 896), request_id=9))   # a 1 MB prefill
    sent.append(Shutdown())
    with Inbox(context) as inbox, Outbox(context, inbox.address) as outbox:
        for msg in sent:
            outbox.send(msg)
        for msg in sent:
            assert_same(inbox.recv(timeout_ms=5000), msg)


def test_malformed_message_raises_and_the_inbox_keeps_working(context):
    with Inbox(context) as inbox, context.socket(zmq.PUSH) as raw, \
            Outbox(context, inbox.address) as outbox:
        raw.connect(inbox.address)
        raw.send_multipart([MAGIC + b"\x02", b"junk"])
        raw.send_multipart([header(Kind.PING, 8), b"x", b"y"])
        raw.send_multipart([forward_header(request_id=9), bytes(23)])
        with pytest.raises(FrameError, match="shorter than"):
            inbox.recv(timeout_ms=5000)
        with pytest.raises(FrameError, match="1 or 2 frames, got 3"):
            inbox.recv(timeout_ms=5000)
        with pytest.raises(FrameError, match="has 23 bytes") as info:
            inbox.recv(timeout_ms=5000)
        assert info.value.request_id == 9   # a receiver can still answer request 9
        outbox.send(Ping(3))
        assert inbox.recv(timeout_ms=5000) == Ping(3)


def test_message_over_the_size_limit_is_dropped_and_the_inbox_keeps_working(context):
    # libzmq drops the connection of a peer that sends more than MAXMSGSIZE in one frame
    too_big = torch.empty(MAX_MESSAGE_BYTES // 4 + 1)   # uninitialised: cheap to allocate
    with Inbox(context) as inbox:
        with Outbox(context, inbox.address, send_timeout_ms=5000) as outbox:
            outbox.send(fwd(too_big))
            assert inbox.recv(timeout_ms=500) is None
        del too_big
        with Outbox(context, inbox.address, send_timeout_ms=5000) as outbox:
            outbox.send(Ping(4))
            assert inbox.recv(timeout_ms=5000) == Ping(4)


def stage_worker(inbox: Inbox, outbox: Outbox, scale: float, last: bool) -> None:
    """A toy stage: scales activations and records its time; the last one sends a Token (the
    argmax); control messages pass on; it stops after SHUTDOWN."""
    while (msg := inbox.recv(timeout_ms=5000)) is not None:
        if isinstance(msg, Forward):
            hidden = msg.tensor * scale
            stage_ms = msg.stage_ms + (float(scale),)
            msg = (Token(msg.request_id, int(hidden.argmax()), stage_ms) if last else
                   Forward(msg.request_id, msg.position, hidden, msg.sampling, stage_ms))
        outbox.send(msg)
        if isinstance(msg, Shutdown):
            return


def test_two_stage_pipeline_over_threads(context):
    back, stage1_in, stage0_in = Inbox(context), Inbox(context), Inbox(context)
    stage0_out = Outbox(context, stage1_in.address)
    stage1_out = Outbox(context, back.address)
    to_stage0 = Outbox(context, stage0_in.address)
    workers = [threading.Thread(target=stage_worker, args=(stage0_in, stage0_out, 2.0, False)),
               threading.Thread(target=stage_worker, args=(stage1_in, stage1_out, 3.0, True))]
    for worker in workers:
        worker.start()
    try:
        for request_id in (1, 2, 1, 2):
            hidden = torch.zeros(1, 1, 4)
            hidden[0, 0, request_id] = 1.0
            to_stage0.send(fwd(hidden, request_id=request_id, sampling=SAMPLED))
        to_stage0.send(Free(1))
        to_stage0.send(Shutdown())
        received = [back.recv(timeout_ms=5000) for _ in range(6)]
    finally:
        for worker in workers:
            worker.join(timeout=10)
        for sock in (back, stage1_in, stage0_in, stage0_out, stage1_out, to_stage0):
            sock.close()
    assert received == [Token(1, 1, (2.0, 3.0)), Token(2, 2, (2.0, 3.0)), Token(1, 1, (2.0, 3.0)),
                        Token(2, 2, (2.0, 3.0)), Free(1), Shutdown()]


# ------------------------------------------------------------------------ async sockets

def run_async(main) -> None:
    """Run ``main(ctx)`` on a fresh asyncio loop with its own asyncio zmq context."""
    async def wrapper():
        ctx = zmq.asyncio.Context()
        try:
            await main(ctx)
        finally:
            ctx.destroy(linger=0)

    asyncio.run(wrapper())


def test_async_inbox_and_outbox_round_trip_in_order():
    async def main(ctx):
        with AsyncInbox(ctx) as inbox, AsyncOutbox(ctx, inbox.address) as outbox:
            assert inbox.address == f"tcp://127.0.0.1:{inbox.port}"
            assert await inbox.recv(timeout_ms=20) is None
            sent = [Token(i % 4, i, (float(i),)) for i in range(50)]
            sent += [fwd(torch.randn(1, 300, 896), request_id=5, sampling=SAMPLED, stage_ms=(1.0,)),
                     Error(1, "boom"), Free(2), Ping(3), Shutdown()]
            for msg in sent:
                await outbox.send(msg)
            for msg in sent:
                assert_same(await inbox.recv(), msg)
            assert await inbox.recv(timeout_ms=0) is None

    run_async(main)


def test_async_and_sync_ends_interoperate_on_a_sync_context(context):
    # the coordinator's AsyncInbox receives from a stage's sync Outbox, and vice versa
    async def main():
        with AsyncInbox(context) as tokens_in, Inbox(context) as stage_in, \
                AsyncOutbox(context, stage_in.address) as to_stage:
            def stage():
                msg = stage_in.recv(timeout_ms=5000)
                with Outbox(context, tokens_in.address) as out:
                    out.send(Token(msg.request_id, int(msg.tensor.item()) + 1, (0.5,)))
                    out.close(linger_ms=1000)

            worker = threading.Thread(target=stage)
            worker.start()
            await to_stage.send(fwd(torch.tensor([[41]]), request_id=7))
            reply = await tokens_in.recv(timeout_ms=5000)
            await asyncio.to_thread(worker.join, 10)
            return reply

    assert asyncio.run(main()) == Token(7, 42, (0.5,))


def test_async_send_to_nobody_times_out_with_a_cluster_error():
    async def main(ctx):
        address = tcp_address("127.0.0.1", free_port())
        with AsyncOutbox(ctx, address, send_timeout_ms=100) as out:
            with pytest.raises(ClusterError, match="within 100 ms"):
                await out.send(Ping(1))

    run_async(main)


def test_async_malformed_message_raises_frame_error_and_the_inbox_keeps_working():
    async def main(ctx):
        with AsyncInbox(ctx) as inbox, ctx.socket(zmq.PUSH) as raw, \
                AsyncOutbox(ctx, inbox.address) as outbox:
            raw.connect(inbox.address)
            await raw.send_multipart([b"NOPE" + bytes(20)])
            with pytest.raises(FrameError, match="bad magic"):
                await inbox.recv(timeout_ms=5000)
            await outbox.send(Free(5))
            assert await inbox.recv(timeout_ms=5000) == Free(5)

    run_async(main)


# ------------------------------------------------------------------------ hop benchmark

@pytest.mark.parametrize("payload_bytes", [0, 16, 1001, 3584])
def test_measure_hop_overhead_returns_sane_numbers(payload_bytes):
    result = measure_hop_overhead(n=50, payload_bytes=payload_bytes, warmup=5)
    assert result["n"] == 50 and result["payload_bytes"] == payload_bytes
    for name in ("hop", "pair"):
        median, p90 = result[f"{name}_median_ms"], result[f"{name}_p90_ms"]
        # positive, finite, p90 at or above the median, and below a second (a loopback hop)
        assert 0 < median <= p90 < 1000


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"n": -5}, {"payload_bytes": -1}], ids=str)
def test_measure_hop_overhead_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="need n >= 1 and payload_bytes >= 0"):
        measure_hop_overhead(**kwargs)
