"""The data plane (:mod:`exo_lab.wire`): typed messages and their bytes, malformed and hostile
input, and real zmq sockets on loopback (127.0.0.1 only).

A step's :class:`Forward` carries one :class:`Row` (KV slot, position, sampling settings,
whether to sample) per tensor row; the last stage answers with one :class:`Sampled` holding a
token id per row (``NO_TOKEN`` where the row did not sample).

Sections: round trips, rows and batches, tensor memory, encode refusals, decode refusals,
bounded decoding, sync sockets, async sockets, the hop benchmark.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import re
import socket
import struct
import threading
import time

import pytest
from ports import free_port
import torch
import zmq
import zmq.asyncio

from exo_lab.bench import measure_hop_overhead
from exo_lab.errors import ClusterError, ConfigError
from exo_lab.sampling import SamplingSettings, sample_token
from exo_lab.security import derive_key, new_secret
from exo_lab.wire import (
    NO_TOKEN, AsyncInbox, AsyncOutbox, Copy, Error, Forward, FrameError, Free, Inbox, Kind, Outbox, Ping,
    Row, Sampled, Short, Shutdown, decode, encode, msg_id,
)
from exo_lab.wire.frames import (
    BIAS, COPY_BODY, DIM, FORWARD_BODY, HEADER, LOGPROB, MAGIC, MAX_ERROR_BYTES, MAX_ROWS, MAX_STAGES, MS,
    NO_LOGPROB, ROW, ROW_EXTRA, SAMPLED_BODY, SAMPLED_EXTRA, SLOT, VERSION,
)
from exo_lab.wire.sockets import MAX_MESSAGE_BYTES, tcp_address

torch.set_num_threads(1)

GREEDY = SamplingSettings()
SAMPLED = SamplingSettings(temperature=0.7, top_p=0.9, top_k=40, seed=1234)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32]
DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.int64: 4, torch.int32: 5}
SHAPES = [(7,), (3, 5), (1, 4, 896), (4, 2, 16)]
MESSAGE_TYPES = (Forward, Sampled, Free, Error, Ping, Shutdown, Copy, Short)
U16, U32, U64 = 2**16 - 1, 2**32 - 1, 2**64 - 1


def make_tensor(shape, dtype=torch.float32) -> torch.Tensor:
    values = torch.randn(shape) * 100
    return values.to(dtype) if dtype.is_floating_point else values.to(torch.int64).to(dtype)


def fwd(tensor, step_id=1, rows=None, *, position=0, sampling=GREEDY, sample=True,
        stage_ms=()) -> Forward:
    """A Forward of ``tensor``; without ``rows``, one Row per tensor row (slots 0, 1, ..., all at
    ``position`` with ``sampling``)."""
    if rows is None:
        count = tensor.shape[0] if isinstance(tensor, torch.Tensor) and tensor.ndim else 1
        rows = tuple(Row(slot, position, sampling, sample) for slot in range(count))
    return Forward(step_id, tuple(rows), tensor, tuple(stage_ms))


def round_trip(msg):
    return decode([bytes(frame) for frame in encode(msg)])


def as_f32(values) -> tuple[float, ...]:
    return struct.unpack(f"<{len(values)}f", struct.pack(f"<{len(values)}f", *values))


def on_the_wire(sampling: SamplingSettings) -> SamplingSettings:
    """What a receiver gets: the wire has no "no seed", so None travels as 0 (which
    sample_token treats alike)."""
    return SamplingSettings(temperature=sampling.temperature, top_p=sampling.top_p,
                            top_k=sampling.top_k, seed=sampling.seed or 0)


def row_on_the_wire(row: Row) -> Row:
    return dataclasses.replace(row, sampling=on_the_wire(row.sampling), sample=bool(row.sample))


def assert_same(received, sent) -> None:
    assert type(received) is type(sent)
    if not isinstance(sent, Forward):
        assert received == dataclasses.replace(sent, **_f32_ms(sent))
        return
    assert (received.step_id, received.stage_ms) == (sent.step_id, as_f32(sent.stage_ms))
    assert received.rows == tuple(row_on_the_wire(row) for row in sent.rows)
    assert all(type(row.sample) is bool for row in received.rows)
    assert received.tensor.dtype == sent.tensor.dtype
    assert received.tensor.shape == sent.tensor.shape
    assert received.tensor.device.type == "cpu"
    assert torch.equal(received.tensor, sent.tensor.detach().cpu())


def _f32_ms(msg) -> dict:
    return {"stage_ms": as_f32(msg.stage_ms)} if isinstance(msg, Sampled) else {}


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


# ------------------------------------------------------------------------ round trips

BATCH_ROWS = (   # a continuous-batching step: decodes, a prefill chunk that does not sample yet
    Row(0, 17, GREEDY),
    Row(5, 3, SAMPLED),
    Row(U16, U32, SamplingSettings(temperature=2.0, top_p=0.5, top_k=U32, seed=U64)),
    Row(9, 0, SamplingSettings(temperature=1.0), sample=False),
)

ROUND_TRIPS = {
    "forward-minimal": fwd(torch.tensor([[1, 2, 3]])),
    "forward-full": fwd(make_tensor((1, 2, 8)), step_id=U64,
                        rows=(Row(U16, U32, SamplingSettings(temperature=2.0, top_p=0.5, top_k=U32,
                                                             seed=U64)),),
                        stage_ms=(1.5, 0.25, 1e-3)),
    "forward-id-0-seed-0": fwd(torch.tensor([5]), step_id=0,
                               sampling=SamplingSettings(temperature=1.0, seed=0)),
    "forward-seed-none": fwd(torch.tensor([5]), sampling=SamplingSettings(temperature=1.0)),
    "forward-no-sample": fwd(torch.tensor([[5, 6]]), position=40, sample=False),
    "forward-max-stages": fwd(torch.tensor([5]), stage_ms=[float(i) for i in range(MAX_STAGES)]),
    "forward-batch": fwd(make_tensor((4, 1, 16)), step_id=77, rows=BATCH_ROWS, stage_ms=(0.5,)),
    "forward-batch-token-ids": fwd(torch.tensor([[1], [2], [3], [4]]), step_id=78, rows=BATCH_ROWS),
    "sampled-minimal": Sampled(0, (0,)),
    "sampled-full": Sampled(U64, (NO_TOKEN - 1, NO_TOKEN, 0), (1.5, 2.25, 0.0, 0.1)),
    "sampled-no-token": Sampled(5, (NO_TOKEN,)),
    "sampled-batch": Sampled(6, (11, NO_TOKEN, 12, NO_TOKEN, 13)),
    "sampled-max-stages": Sampled(3, (7,), tuple(float(i) for i in range(MAX_STAGES))),
    "sampled-max-rows": Sampled(4, tuple(range(MAX_ROWS))),
    "free-0": Free(0, 0),
    "free-max": Free(U64, U16),
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
    received = round_trip(msg)
    assert_same(received, msg)
    assert msg_id(received) == msg_id(msg)


def test_msg_id_is_the_header_id_of_every_kind():
    assert [msg_id(m) for m in (fwd(torch.ones(1), step_id=3), Sampled(4, (1,)), Error(5, "x"),
                                Free(6, 9), Ping(7), Shutdown(8), Shutdown())] == [3, 4, 5, 6, 7, 8, 0]
    for msg in ROUND_TRIPS.values():
        (_, _, _, header_id) = HEADER.unpack_from(bytes(encode(msg)[0]))
        assert header_id == msg_id(msg)


@pytest.mark.parametrize("sampling", [
    SamplingSettings(),
    SamplingSettings(temperature=1e-5, top_p=1e-9, top_k=1, seed=1),
    SamplingSettings(temperature=0.7, top_p=0.9, top_k=50, seed=2**63),
    SamplingSettings(temperature=2, top_p=1, top_k=U32, seed=U64),   # ints are numbers too
    SamplingSettings(temperature=-0.0, top_p=0.3333333333333333),
], ids=["defaults", "tiny", "typical", "max", "odd-floats"])
def test_sampling_settings_travel_exactly(sampling):
    received = round_trip(fwd(torch.tensor([1]), sampling=sampling)).rows[0].sampling
    assert received == on_the_wire(sampling)
    assert isinstance(received.top_k, int) and isinstance(received.seed, int)


def test_seed_none_travels_as_zero_and_samples_the_same_tokens():
    unseeded = SamplingSettings(temperature=1.0)
    received = round_trip(fwd(torch.tensor([1]), sampling=unseeded)).rows[0].sampling
    assert received.seed == 0
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    for position in range(5):
        assert sample_token(logits, received, position) == sample_token(logits, unseeded, position)


@pytest.mark.parametrize("make", [lambda ms: Sampled(1, (2,), ms),
                                  lambda ms: fwd(torch.ones(1), stage_ms=ms)], ids=["sampled", "forward"])
def test_stage_ms_travel_as_float32(make):
    received = round_trip(make((0.1, 1e30, float("inf")))).stage_ms
    assert received == as_f32((0.1, 1e30, float("inf"))) and received[0] != 0.1
    assert math.isnan(round_trip(make((float("nan"),))).stage_ms[0])


def test_kind_codes_and_byte_layout_are_stable():
    # other PCs may run another build: the wire codes and sizes must never move
    assert VERSION == 7
    assert {kind.name: kind.value for kind in Kind} == {
        "FORWARD": 1, "SAMPLED": 2, "FREE": 3, "ERROR": 4, "PING": 5, "SHUTDOWN": 7, "COPY": 8, "SHORT": 9,
        "TRAIN_FORWARD": 10, "TRAIN_BACKWARD": 11, "TRAIN_LOSS": 12, "TRAIN_STEP": 13}
    assert (HEADER.size, FORWARD_BODY.size, ROW.size, SAMPLED_BODY.size, SLOT.size, DIM.size,
            MS.size) == (12, 5, 35, 3, 2, 4, 4)
    assert (ROW_EXTRA.size, BIAS.size, SAMPLED_EXTRA.size, LOGPROB.size, COPY_BODY.size, NO_LOGPROB) == (
        11, 12, 5, 12, 8, 0xFF)
    assert encode(Copy(1, 258, 3, 0x01020304)) == [
        b"EX\x07\x08" + (1).to_bytes(8, "little") + b"\x02\x01\x03\x00\x04\x03\x02\x01"]
    assert NO_TOKEN == 0xFFFFFFFF and MAX_ROWS == 0xFFFF
    assert encode(Short(1, 2, 3, 4)) == [b"EX\x07\x09" + (1).to_bytes(8, "little") + b"\x02\x00"
                                         + (3).to_bytes(8, "little") + (4).to_bytes(8, "little")]
    assert encode(Ping(0x0102030405060708)) == [b"EX\x07\x05\x08\x07\x06\x05\x04\x03\x02\x01"]
    assert encode(Shutdown()) == [b"EX\x07\x07" + bytes(8)]
    assert encode(Free(1, 258)) == [b"EX\x07\x03" + (1).to_bytes(8, "little") + b"\x02\x01"]
    assert encode(Sampled(1, (258, NO_TOKEN), (1.0,))) == [
        b"EX\x07\x02" + (1).to_bytes(8, "little") + b"\x02\x00\x01"
        + b"\x02\x01\x00\x00" + b"\xff\xff\xff\xff" + struct.pack("<f", 1.0)
        + bytes(4) + b"\x00" + b"\xff\xff"]                          # no vectors, no verify samples, no logprobs
    assert encode(Error(1, "ü")) == [b"EX\x07\x04" + (1).to_bytes(8, "little") + "ü".encode()]
    rows = (Row(1, 7, GREEDY), Row(0x0302, 0x07060504, SAMPLED, sample=False))
    msg = fwd(torch.ones(2, 3), step_id=42, rows=rows, stage_ms=(0.5,))
    header, payload = encode(msg)
    # the layout spelled out byte by byte, independent of the struct constants
    assert bytes(header) == (
        b"EX\x07\x01" + (42).to_bytes(8, "little")
        + b"\x02\x00" + b"\x01" + b"\x02" + b"\x01"                            # rows, dtype, ndim, stages
        + (2).to_bytes(4, "little") + (3).to_bytes(4, "little")                 # dims
        + b"\x01\x00" + b"\x07\x00\x00\x00" + b"\x01"                           # slot, position, sample
        + struct.pack("<d", 0.0) + struct.pack("<d", 1.0) + bytes(4) + bytes(8)   # greedy, seed 0
        + b"\x02\x03" + b"\x04\x05\x06\x07" + b"\x00"
        + struct.pack("<d", 0.7) + struct.pack("<d", 0.9) + (40).to_bytes(4, "little")
        + (1234).to_bytes(8, "little")
        + struct.pack("<f", 0.5)
        + (b"\xff" + b"\x00" + b"\x00" + bytes(4) + bytes(2) + bytes(2)) * 2)     # no logprobs, embed, rule, adapter
    assert bytes(header) == forward_header(rows=(raw_row(slot=1, position=7),
                                                 raw_row(slot=0x0302, position=0x07060504, flags=0,
                                                         temperature=0.7, top_p=0.9, top_k=40,
                                                         seed=1234)),
                                           stage_ms=(0.5,))
    assert bytes(payload) == struct.pack("<6f", *[1.0] * 6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_dtype_and_shape_round_trips_bit_exact(dtype, shape):
    msg = fwd(make_tensor(shape, dtype), step_id=17, position=4)
    header, payload = encode(msg)
    assert len(payload) == math.prod(shape) * msg.tensor.element_size()   # raw bytes only
    # the dtype codes are part of the wire format: append, never renumber
    assert bytes(header) == forward_header(shape=shape, dtype_code=DTYPE_CODES[dtype], message_id=17,
                                           rows=tuple(raw_row(slot=i, position=4) for i in range(shape[0])))
    assert_same(round_trip(msg), msg)


def test_bfloat16_bytes_travel_unchanged():
    # bfloat16 has no numpy dtype; the wire must carry its exact bit patterns
    values = torch.tensor([[1.0, -2.5, 3.0e38, float("inf"), float("-inf"), 1e-40, -0.0]],
                          dtype=torch.bfloat16)
    received = round_trip(fwd(values)).tensor
    assert received.dtype is torch.bfloat16
    assert torch.equal(received.view(torch.int16), values.view(torch.int16))


@pytest.mark.parametrize("shape", [(1, 0), (1, 0, 896), (3, 4, 0), (2, 0, 0)], ids=str)
def test_empty_tensors_round_trip(shape):
    msg = fwd(torch.zeros(shape))
    assert len(msg.rows) == shape[0]
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
    msg = fwd(prefill, step_id=2, stage_ms=(3.5,), sample=False)
    assert len(encode(msg)[1]) == prefill.nbytes
    assert_same(round_trip(msg), msg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_tensor_is_moved_to_cpu_on_encode():
    sent = torch.randn(2, 3, 896, device="cuda", dtype=torch.bfloat16)
    received = round_trip(fwd(sent)).tensor
    assert received.device.type == "cpu" and torch.equal(received, sent.cpu())


# ------------------------------------------------------------------------ rows and batches

@pytest.mark.parametrize("slot", [0, 1, 258, U16 - 1, U16])
@pytest.mark.parametrize("position", [0, 1, 2**16, 2**31, U32 - 1, U32])
@pytest.mark.parametrize("sample", [True, False])
def test_row_fields_round_trip_at_their_limits(slot, position, sample):
    sent = Row(slot, position, SAMPLED, sample)
    (received,) = round_trip(fwd(torch.ones(1, 1), rows=(sent,))).rows
    assert received == row_on_the_wire(sent)
    assert (received.slot, received.position, received.sample) == (slot, position, sample)


@pytest.mark.parametrize("sampling", [
    GREEDY, SAMPLED, SamplingSettings(temperature=1.0), SamplingSettings(temperature=2.0, top_p=1e-9),
    SamplingSettings(temperature=0.3, top_k=U32, seed=U64), SamplingSettings(top_k=1, seed=0),
], ids=["greedy", "sampled", "seed-none", "extreme-floats", "max-ints", "seed-0"])
def test_each_row_keeps_its_own_sampling_settings(sampling):
    rows = (Row(0, 0, GREEDY), Row(1, 5, sampling), Row(2, 9, SAMPLED, sample=False))
    received = round_trip(fwd(torch.zeros(3, 2, 4), rows=rows)).rows
    assert received == tuple(row_on_the_wire(row) for row in rows)
    assert received[1].sampling == on_the_wire(sampling)


def test_many_rows_stay_in_order_and_match_their_tensor_rows():
    rng = random.Random(5)
    rows = tuple(Row(rng.randrange(U16 + 1), rng.randrange(U32 + 1),
                     SamplingSettings(temperature=rng.choice((0.0, 0.5, 2.0)), top_p=rng.choice((1.0, 0.25)),
                                      top_k=rng.randrange(100), seed=rng.randrange(2**64)),
                     rng.random() < 0.5) for _ in range(200))
    tensor = torch.arange(200 * 3, dtype=torch.int64).reshape(200, 3)
    msg = fwd(tensor, step_id=9, rows=rows, stage_ms=(1.0, 2.0))
    header, _ = encode(msg)
    assert len(header) == HEADER.size + FORWARD_BODY.size + 2 * DIM.size + 200 * ROW.size + 2 * MS.size \
        + 200 * ROW_EXTRA.size
    received = round_trip(msg)
    assert_same(received, msg)
    for index, row in enumerate(received.rows):   # row b of the tensor is rows[b]
        assert row == row_on_the_wire(rows[index])
        assert received.tensor[index, 0] == 3 * index


def test_the_largest_batch_round_trips():
    rows = tuple(Row(slot, slot * 3, SAMPLED, slot % 2 == 0) for slot in range(MAX_ROWS))
    tensor = torch.arange(MAX_ROWS, dtype=torch.int32).reshape(MAX_ROWS, 1)
    received = round_trip(fwd(tensor, rows=rows))
    assert received.rows == rows   # SAMPLED has a seed, so it travels unchanged
    assert received.rows[-1] == Row(U16 - 1, (U16 - 1) * 3, SAMPLED, True)
    assert torch.equal(received.tensor, tensor)


@pytest.mark.parametrize("rows, shape", [(1, (2, 3)), (3, (2, 3)), (2, (1, 4, 8)), (1, (7,)), (4, (3,))],
                         ids=["1-for-2", "3-for-2", "2-for-1", "1-for-7", "4-for-3"])
def test_encode_refuses_a_row_count_that_is_not_the_tensor_s(rows, shape):
    msg = Forward(5, tuple(Row(i, 0, GREEDY) for i in range(rows)), torch.zeros(shape))
    with pytest.raises(FrameError, match=rf"needs one Row per tensor row .* got {rows} rows for a tensor "
                                         rf"of shape {re_tuple(shape)}") as info:
        encode(msg)
    assert info.value.message_id == 5


def re_tuple(shape) -> str:
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


@pytest.mark.parametrize("count, shape", [(1, (2, 3)), (3, (2, 3)), (2, (1, 6)), (U16, (2, 3))],
                         ids=["1-for-2", "3-for-2", "2-for-1", "max-for-2"])
def test_decode_refuses_a_header_whose_row_count_disagrees_with_the_tensor(count, shape):
    head = forward_header(shape=shape, rows=tuple(raw_row(slot=i) for i in range(count)))
    with pytest.raises(FrameError, match=f"FORWARD of step 42 has {count} rows but a tensor of {shape[0]}") as info:
        decode([head, bytes(4 * math.prod(shape))])
    assert info.value.message_id == 42


@pytest.mark.parametrize("tensor", [torch.zeros(0), torch.zeros(0, 896), torch.zeros(0, 1, 4)], ids=str)
def test_a_forward_without_rows_is_refused_both_ways(tensor):
    with pytest.raises(FrameError, match="needs one Row per tensor row"):
        encode(Forward(1, (), tensor))
    shape = tuple(tensor.shape)
    with pytest.raises(FrameError, match="0 rows is not a batch"):
        decode([forward_header(shape=shape, rows=()), b""])


@pytest.mark.parametrize("flags", [2, 4, 0x80, 255])
@pytest.mark.parametrize("which", [0, 1])
def test_row_flags_other_than_0_1_or_3_are_refused(flags, which):
    rows = [raw_row(slot=0), raw_row(slot=1)]
    rows[which] = raw_row(slot=which, flags=flags)
    with pytest.raises(FrameError, match=f"FORWARD of step 42: unknown row flags {flags}") as info:
        decode([forward_header(rows=tuple(rows)), bytes(24)])
    assert info.value.message_id == 42


def test_a_verify_row_and_its_samples_round_trip_and_a_verify_row_samples_plainly():
    rows = (Row(0, 7, GREEDY, True, verify=True), Row(1, 3, GREEDY, True))
    received = round_trip(fwd(torch.ones(2, 4), rows=rows))
    assert [(row.verify, row.sample) for row in received.rows] == [(True, True), (False, True)]
    sampled = Sampled(5, (1, 2), (0.5,), verified=((1, 9, U32 - 2, 0), ()))
    assert round_trip(sampled) == sampled and round_trip(Sampled(5, (1,))).verified == ()
    for bad in (Row(0, 0, GREEDY, False, verify=True), Row(0, 0, GREEDY, True, logprobs=2, verify=True),
                Row(0, 0, GREEDY, True, embed=1, verify=True)):
        with pytest.raises(FrameError, match="a verify Row samples"):
            encode(fwd(torch.ones(1, 2), rows=(bad,)))
    with pytest.raises(FrameError, match="at most 64 ids"):
        encode(Sampled(5, (1,), verified=(tuple(range(65)),)))
    with pytest.raises(FrameError, match="one tuple per row"):
        encode(Sampled(5, (1, 2), verified=((1,),)))


def test_row_flags_0_and_1_are_sample_false_and_true():
    received = decode([forward_header(rows=(raw_row(flags=0), raw_row(slot=1, flags=1))), bytes(24)])
    assert [row.sample for row in received.rows] == [False, True]
    header = bytes(encode(fwd(torch.ones(2, 1), rows=(Row(0, 0, GREEDY, True), Row(1, 0, GREEDY, False))))[0])
    first_flags = HEADER.size + FORWARD_BODY.size + 2 * DIM.size + 6
    assert header[first_flags] == 1 and header[first_flags + ROW.size] == 0


def test_sampled_carries_no_token_for_rows_that_did_not_sample():
    received = round_trip(Sampled(8, (NO_TOKEN, 0, NO_TOKEN, U32 - 1), (0.25,)))
    assert received.token_ids == (NO_TOKEN, 0, NO_TOKEN, U32 - 1)
    assert all(isinstance(token, int) for token in received.token_ids)
    raw = (header(Kind.SAMPLED, 8) + SAMPLED_BODY.pack(2, 0) + struct.pack("<2I", NO_TOKEN, 17)
           + SAMPLED_EXTRA.pack(0, 0) + bytes([NO_LOGPROB, NO_LOGPROB]))
    assert decode([raw]) == Sampled(8, (NO_TOKEN, 17))


@pytest.mark.parametrize("slot", [0, 1, 258, U16])
def test_free_carries_its_slot(slot):
    (frame,) = encode(Free(11, slot))
    assert bytes(frame) == header(Kind.FREE, 11) + slot.to_bytes(2, "little")
    assert round_trip(Free(11, slot)) == Free(11, slot)
    assert decode([header(Kind.FREE, 11) + SLOT.pack(slot)]) == Free(11, slot)


@pytest.mark.parametrize("body", [b"", b"\x01", b"\x01\x00\x00", b"\x01\x00\x00\x00", bytes(64)],
                         ids=["missing", "half", "one-stray", "two-stray", "many-stray"])
def test_free_without_exactly_one_slot_is_refused(body):
    with pytest.raises(FrameError, match=f"FREE 42 has {len(body)} body bytes, not 2") as info:
        decode([header(Kind.FREE) + body])
    assert info.value.message_id == 42


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
    header, payload = encode(fwd(torch.arange(4.0).reshape(1, 4)))
    backing = bytearray(payload)
    received = decode([header, backing]).tensor
    received[0, 0] = 9.0
    assert backing[:4] == struct.pack("<f", 9.0)


def test_unaligned_payload_decodes_to_an_aligned_tensor():
    sent = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    header, payload = encode(fwd(sent))
    backing = bytearray(1 + len(payload))
    shifted = memoryview(backing)[1:]   # libzmq may hand out odd offsets
    shifted[:] = payload
    assert torch.frombuffer(shifted, dtype=torch.uint8).data_ptr() % 8   # really unaligned
    received = decode([header, shifted]).tensor
    assert received.data_ptr() % 8 == 0 and torch.equal(received, sent)
    received[0, 0] = 99
    assert bytes(shifted) == bytes(payload)   # the copy is the tensor's own


def test_aligned_zmq_frame_is_shared_not_copied():
    header, payload = encode(fwd(torch.arange(4.0).reshape(1, 4)))
    frame = zmq.Frame(bytes(payload))   # small: zmq copies it into a message it owns
    received = decode([header, frame]).tensor
    if received.data_ptr() % 4:
        pytest.skip("zmq placed this frame unaligned, so decode had to copy")
    received[0, 0] = 9.0
    assert bytes(frame.buffer[:4]) == struct.pack("<f", 9.0)


def test_payload_is_a_view_not_a_copy():
    tensor = torch.zeros(2, 2)
    payload = encode(fwd(tensor))[1]
    tensor[0, 0] = 1.0
    assert bytes(payload[:4]) == struct.pack("<f", 1.0)


# ------------------------------------------------------------------------ encode refusals

def with_seed(seed) -> SamplingSettings:
    """Settings holding a seed SamplingSettings itself would refuse (a buggy caller)."""
    settings = SamplingSettings(seed=1)
    object.__setattr__(settings, "seed", seed)
    return settings


def one_row(**fields) -> tuple[Row, ...]:
    return (Row(**{"slot": 0, "position": 0, "sampling": GREEDY, **fields}),)


@pytest.mark.parametrize("make, message", [
    (lambda: object(), "cannot send a object; send one of Forward, Sampled, Free, Error, Ping, Shutdown"),
    (lambda: "PING", "cannot send a str"),
    (lambda: Kind.PING, "cannot send a Kind"),
    (lambda: Row(0, 0, GREEDY), "cannot send a Row"),
    (lambda: Ping(-1), r"message id must be an int in \[0, 2\*\*64\), got -1"),
    (lambda: Ping(2**64), "message id must be an int"),
    (lambda: Free(True, 0), "got True"),
    (lambda: Sampled(1.0, (2,)), "message id must be an int"),
    (lambda: Error(None, "x"), "message id must be an int"),
    (lambda: fwd(torch.ones(1), step_id=-1), "message id"),
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
    (lambda: fwd(torch.ones(1), rows=one_row(slot=-1)), r"slot must be an int in \[0, 65535\], got -1"),
    (lambda: fwd(torch.ones(1), rows=one_row(slot=2**16)), "slot must be an int"),
    (lambda: fwd(torch.ones(1), rows=one_row(slot=False)), "slot .* got False"),
    (lambda: fwd(torch.ones(1), rows=one_row(slot="0")), "slot"),
    (lambda: Forward(1, [Row(0, 0, GREEDY)], torch.ones(1)), "needs one Row per tensor row"),
    (lambda: Forward(1, Row(0, 0, GREEDY), torch.ones(1)), "needs one Row per tensor row"),
    (lambda: Forward(1, (), torch.ones(1)), r"\(1 to 65535\), got 0 rows"),
    (lambda: Forward(1, ((0, 0, GREEDY, True),), torch.ones(1)), "must hold Rows"),
    (lambda: Forward(1, (None,), torch.ones(1)), "must hold Rows"),
    (lambda: Forward(1, tuple(Row(0, 0, GREEDY) for _ in range(MAX_ROWS + 1)), torch.ones(MAX_ROWS + 1)),
     "1 to 65535"),
    (lambda: Sampled(1, (-1,)), "token_id"),
    (lambda: Sampled(1, (2**32,)), "token_id"),
    (lambda: Sampled(1, (1.0,)), "token_id"),
    (lambda: Sampled(1, (5, True)), "token_id"),
    (lambda: Sampled(1, [5]), "token_ids must be a tuple"),
    (lambda: Sampled(1, 5), "token_ids must be a tuple"),
    (lambda: Sampled(1, tuple(range(MAX_ROWS + 1))), "at most 65535 ids"),
    (lambda: Free(1, -1), r"slot must be an int in \[0, 65535\]"),
    (lambda: Free(1, 2**16), "slot"),
    (lambda: Free(1, None), "slot"),
    (lambda: fwd(torch.ones(1), sampling=with_seed(-1)), "sampling.seed"),
    (lambda: fwd(torch.ones(1), sampling=with_seed(2**64)), "sampling.seed"),
], ids=["object", "str", "kind", "row", "id-negative", "id-too-big", "id-bool", "id-float",
        "id-none", "forward-id", "tensor-type", "complex", "float64", "bool", "0-dims", "4-dims",
        "sparse", "position-negative", "position-too-big", "position-float", "slot-negative",
        "slot-too-big", "slot-bool", "slot-str", "rows-list", "rows-bare-row", "rows-empty",
        "rows-tuples", "rows-none", "rows-too-many", "token-negative", "token-too-big",
        "token-float", "token-bool", "token-ids-list", "token-ids-int", "token-ids-too-many",
        "free-slot-negative", "free-slot-too-big", "free-slot-none", "seed-negative",
        "seed-too-big"])
def test_encode_rejects_what_the_wire_cannot_carry(make, message):
    with pytest.raises(FrameError, match=message):
        encode(make())


def test_encode_errors_carry_a_valid_message_id():
    for msg in (fwd(torch.ones(1), step_id=7, position=-1), fwd(torch.ones(2), step_id=7, rows=one_row()),
                Sampled(7, (-1,)), Free(7, -1), fwd(torch.ones(1), step_id=7, stage_ms=(None,))):
        with pytest.raises(FrameError) as info:
            encode(msg)
        assert info.value.message_id == 7
        assert isinstance(info.value, ClusterError) and isinstance(info.value, ValueError)
    with pytest.raises(FrameError) as info:
        encode(Ping(-1))
    assert info.value.message_id is None   # no valid id to name


@pytest.mark.parametrize("msg", [Sampled(1, (2,), (0.0,) * (MAX_STAGES + 1)),
                                 fwd(torch.ones(1), stage_ms=(0.0,) * (MAX_STAGES + 1))],
                         ids=["sampled", "forward"])
def test_too_many_stage_timings_is_a_frame_error(msg):
    with pytest.raises(FrameError, match="at most 255"):
        encode(msg)


@pytest.mark.parametrize("stage_ms", [(1e40,), ("1.5",), (None,), [1.0]], ids=["over-f32", "str", "none", "list"])
def test_stage_timings_the_wire_cannot_carry_are_a_frame_error(stage_ms):
    with pytest.raises(FrameError):
        encode(Sampled(1, (2,), stage_ms))
    with pytest.raises(FrameError):
        encode(Forward(1, one_row(), torch.ones(1), stage_ms))


@pytest.mark.parametrize("sampling", [None, {"temperature": 0.0}], ids=["none", "dict"])
def test_forward_without_sampling_settings_is_a_frame_error(sampling):
    with pytest.raises(FrameError, match="SamplingSettings"):
        encode(fwd(torch.ones(1), sampling=sampling))
    with pytest.raises(FrameError, match="SamplingSettings"):   # in any row, not just the first
        encode(fwd(torch.ones(2), rows=(Row(0, 0, GREEDY), Row(1, 0, sampling))))


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

def header(kind=Kind.FORWARD, message_id=42, *, magic=MAGIC, version=VERSION) -> bytes:
    return HEADER.pack(magic, version, kind, message_id)


def raw_row(slot=0, position=1, flags=1, temperature=0.0, top_p=1.0, top_k=0, seed=0) -> tuple:
    """One ROW's fields as the wire holds them (any values: the hostile tests need bad ones)."""
    return (slot, position, flags, temperature, top_p, top_k, seed)


def forward_header(*, shape=(2, 3), dtype_code=1, ndim=None, rows=None, count=None, stage_ms=(),
                   stages=None, extras=None, rules=b"", **head) -> bytes:
    """A FORWARD header frame built by hand from the documented layout (step 42, float32 (2, 3),
    one greedy sampling row at position 1 per tensor row, slots 0, 1, ...)."""
    ndim = len(shape) if ndim is None else ndim
    if rows is None:
        rows = tuple(raw_row(slot=i) for i in range(shape[0] if shape else 1))
    count = len(rows) if count is None else count
    stages = len(stage_ms) if stages is None else stages
    extras = [(-1, 0, 0, 0, 0)] * len(rows) if extras is None else extras
    return (header(Kind.FORWARD, **head) + FORWARD_BODY.pack(count, dtype_code, ndim, stages)
            + b"".join(DIM.pack(d) for d in shape) + b"".join(ROW.pack(*row) for row in rows)
            + b"".join(MS.pack(ms) for ms in stage_ms) + b"".join(ROW_EXTRA.pack(*e, *(0,) * (6 - len(e))) for e in extras) + rules)


def good_forward(**fields) -> list[bytes]:
    return [forward_header(**fields), bytes(24)]


def bad_row(**fields) -> list[bytes]:
    """A (2, 3) FORWARD whose second row has ``fields``: decode checks every row, not the first."""
    return good_forward(rows=(raw_row(), raw_row(slot=1, **fields)))


def sampled_frame(token_ids=(5,), stage_ms=(), count=None, stages=None, hidden=0, tail=None, verified=0,
                  **head) -> bytes:
    """A SAMPLED frame by hand; ``tail``: the logprobs and vectors (default: no logprob per row)."""
    count = len(token_ids) if count is None else count
    stages = len(stage_ms) if stages is None else stages
    tail = bytes([NO_LOGPROB]) * len(token_ids) if tail is None else tail
    return (header(Kind.SAMPLED, **head) + SAMPLED_BODY.pack(count, stages)
            + b"".join(struct.pack("<I", t) for t in token_ids) + b"".join(MS.pack(m) for m in stage_ms)
            + SAMPLED_EXTRA.pack(hidden, verified) + tail)


def test_hand_built_frames_decode():
    assert_same(decode(good_forward(stage_ms=(2.0,))),
                fwd(torch.zeros(2, 3), step_id=42, position=1, stage_ms=(2.0,)))
    assert_same(decode([forward_header(rows=(raw_row(slot=9, position=U32, flags=0, temperature=0.7,
                                                     top_p=0.9, top_k=40, seed=1234), raw_row(slot=U16))),
                        bytes(24)]),
                fwd(torch.zeros(2, 3), step_id=42, rows=(Row(9, U32, SAMPLED, False), Row(U16, 1, GREEDY))))
    assert decode([sampled_frame((5, NO_TOKEN), stage_ms=(1.0, 2.0))]) == Sampled(42, (5, NO_TOKEN), (1.0, 2.0))
    assert decode([header(Kind.FREE) + SLOT.pack(7)]) == Free(42, 7)
    assert decode([header(Kind.PING)]) == Ping(42) and decode([header(Kind.SHUTDOWN)]) == Shutdown(42)


MALFORMED = {   # id: (frames, message regex, message_id the error carries)
    "no-frames": ([], "1 or 2 frames, got 0", None),
    "three-frames": (good_forward() + [b""], "1 or 2 frames, got 3", None),
    "not-a-list": (b"".join(good_forward()), "1 or 2 frames, got bytes", None),
    "frame-type": ([12345, b""], "bytes-like, got int", None),
    "frame-str": (["EX"], "bytes-like, got str", None),
    "bad-magic": ([b"XX" + forward_header()[2:], bytes(24)], "bad magic b'XX'", None),
    "json-magic": ([b'{"kind": 1}' + bytes(8)], "bad magic", None),
    "newer-version": ([forward_header(version=VERSION + 1), bytes(24)], "wire version 8, this exo-lab speaks 7", 42),
    "old-version": ([forward_header(version=2), bytes(24)], "run the same exo-lab version", 42),
    "old-version-sampled": ([header(Kind.SAMPLED, version=2) + b"\0" * 5], "wire version 2", 42),
    "kind-0": ([header(0)], "unknown message kind 0 for message 42", 42),
    "kind-6": ([header(6)], "unknown message kind 6", 42),
    "kind-255": ([header(255)], "unknown message kind 255", 42),
    "empty-header": ([b""], "header is 0 bytes", None),
    "short-header": ([header(Kind.PING)[:-1]], "header is 11 bytes, shorter than the 12", None),
    "short-forward-body": ([forward_header()[:HEADER.size + FORWARD_BODY.size - 1], bytes(24)],
                           "FORWARD header of step 42 is truncated", 42),
    "short-rows": ([forward_header()[:-1], bytes(24)], "is 104 bytes, its fields need at least 105", 42),
    "short-dims": ([forward_header()[:HEADER.size + FORWARD_BODY.size + 3], bytes(24)],
                   "is 8 bytes, its fields need at least 105", 42),
    "missing-row": ([forward_header(rows=(raw_row(),), count=2), bytes(24)], "is 59 bytes, its fields need at least 105", 42),
    "extra-row": ([forward_header(rows=(raw_row(),) * 3, count=2), bytes(24)], "FORWARD .*of step 42", 42),
    "missing-stage-ms": ([forward_header(stages=2), bytes(24)], "is 105 bytes, its fields need at least 113", 42),
    "extra-header-bytes": ([forward_header() + b"\0", bytes(24)], "has 1 stray bytes", 42),
    "rows-0": ([forward_header(shape=(0, 3), rows=()), b""], "with 2 dims and 0 rows is not a batch", 42),
    "rows-more-than-tensor": ([forward_header(rows=(raw_row(),) * 3), bytes(24)], "has 3 rows but a tensor of 2", 42),
    "rows-fewer-than-tensor": ([forward_header(rows=(raw_row(),)), bytes(24)], "has 1 rows but a tensor of 2", 42),
    "row-flags-2": (bad_row(flags=2), "FORWARD of step 42: unknown row flags 2", 42),
    "row-flags-255": (bad_row(flags=255), "unknown row flags 255", 42),
    "short-sampled": ([header(Kind.SAMPLED) + b"\0" * 2], "SAMPLED of step 42 is truncated", 42),
    "sampled-ms-missing": ([sampled_frame(stages=1)], "SAMPLED of step 42 has the wrong length", 42),
    "sampled-ms-extra": ([sampled_frame() + b"\0"], "SAMPLED of step 42 has 1 stray bytes", 42),
    "sampled-ids-missing": ([sampled_frame((5,), count=2)], "wrong length", 42),
    "sampled-ids-extra": ([sampled_frame((5, 6), count=1)], "SAMPLED of step 42", 42),
    "verified-flag-2": ([sampled_frame(verified=2)], "unknown verified flag 2", 42),
    "verified-truncated": ([sampled_frame(verified=1, tail=bytes([NO_LOGPROB, 3]) + struct.pack("<I", 5))],
                           "a verify row of 3 samples is over 64 or truncated", 42),
    "verified-too-many": ([sampled_frame(verified=1, tail=bytes([NO_LOGPROB, 65]) + bytes(260))],
                          "a verify row of 65 samples is over 64", 42),
    "verified-no-token": ([sampled_frame(verified=1, tail=bytes([NO_LOGPROB, 1]) + struct.pack("<I", NO_TOKEN))],
                          "a verify sample is not a token id", 42),
    "verified-stray": ([sampled_frame(verified=1, tail=bytes([NO_LOGPROB, 0, 9]))], "1 stray bytes", 42),
    "sampled-id-half": ([sampled_frame((5,))[:-2]], "wrong length", 42),
    "free-missing-slot": ([header(Kind.FREE)], "FREE 42 has 0 body bytes, not 2", 42),
    "free-stray": ([header(Kind.FREE) + SLOT.pack(1) + b"\0"], "FREE 42 has 3 body bytes, not 2", 42),
    "ping-stray": ([header(Kind.PING) + b"ab"], "PING 42 has 2 stray bytes", 42),
    "shutdown-stray": ([header(Kind.SHUTDOWN) + b"x"], "SHUTDOWN .* stray", 42),
    "forward-no-payload": ([forward_header()], "FORWARD of step 42 has no payload frame", 42),
    "ping-payload": ([header(Kind.PING), b""], "PING 42 carries a payload frame", 42),
    "sampled-payload": ([sampled_frame(), b"\0" * 8], "SAMPLED .* carries a payload frame", 42),
    "free-payload": ([header(Kind.FREE) + SLOT.pack(1), b"\0\0"], "FREE .* carries a payload frame", 42),
    "error-payload": ([header(Kind.ERROR) + b"boom", b"x"], "ERROR .* carries a payload", 42),
    "payload-short": (good_forward()[:1] + [bytes(23)],
                      r"payload of message 42 has 23 bytes, but shape \[2, 3\] x torch.float32 needs 24", 42),
    "payload-long": (good_forward()[:1] + [bytes(28)], "has 28 bytes", 42),
    "payload-empty": (good_forward()[:1] + [b""], "has 0 bytes", 42),
    "payload-dtype": ([forward_header(dtype_code=4), bytes(24)], "torch.int64 needs 48", 42),
    "payload-huge-shape": ([forward_header(shape=(2, U32, U32)), bytes(24)], "over 268435456 bytes", 42),
    "ndim-0": ([forward_header(shape=(), ndim=0), bytes(4)], "with 0 dims and 1 rows is not a batch", 42),
    "ndim-4": ([forward_header(shape=(2, 1, 1, 3)), bytes(24)], "with 4 dims", 42),
    "ndim-255": ([forward_header(shape=(), ndim=255), bytes(24)], "with 255 dims", 42),
    "dtype-0": ([forward_header(dtype_code=0), bytes(24)], "dtype code 0", 42),
    "dtype-6": ([forward_header(dtype_code=6), bytes(24)], "dtype code 6", 42),
    "dtype-200": ([forward_header(dtype_code=200), bytes(24)], "dtype code 200", 42),
    "error-too-long": ([header(Kind.ERROR) + b"x" * (MAX_ERROR_BYTES + 1)],
                       "ERROR text of step 42 is over 2048 bytes", 42),
    "temperature-nan": (bad_row(temperature=math.nan), "FORWARD of step 42: temperature", 42),
    "temperature-inf": (bad_row(temperature=math.inf), "temperature", 42),
    "temperature-5": (bad_row(temperature=5.0), "temperature must be a number between 0 and 2", 42),
    "temperature-negative": (bad_row(temperature=-1e-9), "temperature", 42),
    "top-p-0": (bad_row(top_p=0.0), r"top_p must be in \(0, 1\]", 42),
    "top-p-negative": (bad_row(top_p=-0.5), "top_p", 42),
    "top-p-over-1": (bad_row(top_p=1.5), "top_p", 42),
    "top-p-nan": (bad_row(top_p=math.nan), "top_p", 42),
}


@pytest.mark.parametrize("frames, message, message_id", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_frames_are_rejected_with_a_clear_error(frames, message, message_id):
    with pytest.raises(FrameError, match=message) as info:
        decode(frames)
    assert info.value.message_id == message_id
    assert isinstance(info.value, ClusterError) and isinstance(info.value, ValueError)


def test_error_text_of_exactly_the_limit_decodes_and_bad_utf8_is_replaced():
    assert decode([header(Kind.ERROR) + b"x" * MAX_ERROR_BYTES]).message == "x" * MAX_ERROR_BYTES
    assert decode([header(Kind.ERROR) + b"a\xffb"]).message == "a\ufffdb"


@pytest.mark.parametrize("shape", [(1, 0, U32), (1, U32, 0), (2, 0, 2**31 + 3)], ids=str)
def test_empty_tensor_with_overflowing_dims_is_a_frame_error(shape):
    with pytest.raises(FrameError, match="over 268435456 bytes even where a dimension is 0"):
        decode([forward_header(shape=shape), b""])


# ------------------------------------------------------------------------ bounded decoding

def assert_decodes_or_frame_error(frames) -> None:
    """Decoding hostile bytes either fails with FrameError or yields a message that is valid
    enough to encode again: any other exception is a bug."""
    try:
        msg = decode(frames)
    except FrameError:
        return
    assert isinstance(msg, MESSAGE_TYPES) and 0 <= msg_id(msg) <= U64
    if isinstance(msg, Forward):
        assert msg.tensor.dtype in DTYPES and 1 <= msg.tensor.ndim <= 3
        assert isinstance(msg.rows, tuple) and 1 <= len(msg.rows) == msg.tensor.shape[0] <= MAX_ROWS
        for row in msg.rows:
            assert isinstance(row, Row) and isinstance(row.sampling, SamplingSettings)
            assert 0 <= row.slot <= U16 and 0 <= row.position <= U32 and type(row.sample) is bool
    elif isinstance(msg, Sampled):
        assert len(msg.token_ids) <= MAX_ROWS and all(0 <= t <= NO_TOKEN for t in msg.token_ids)
    elif isinstance(msg, Free):
        assert 0 <= msg.slot <= U16
    if isinstance(msg, (Forward, Sampled)):
        assert len(msg.stage_ms) <= MAX_STAGES
    assert type(round_trip(msg)) is type(msg)


def valid_encodings() -> list[list[bytes]]:
    msgs = [msg for name, msg in ROUND_TRIPS.items() if name != "sampled-max-rows"] + [
        fwd(make_tensor((1, 3, 4), dtype), sampling=SAMPLED, stage_ms=(1.0, 2.0)) for dtype in DTYPES]
    msgs += [fwd(make_tensor((3, 2, 4), dtype), rows=BATCH_ROWS[:3], stage_ms=(1.0,)) for dtype in DTYPES]
    msgs += [fwd(torch.zeros(1, 0, 4)), fwd(torch.zeros(2, 0)), Error(9, "x" * MAX_ERROR_BYTES),
             Sampled(1, (NO_TOKEN,) * 4, (0.5,)), Free(3, U16), Short(4, 2, 1 << 30, 1 << 31)]
    return [[bytes(frame) for frame in encode(msg)] for msg in msgs]


def test_random_garbage_decodes_or_raises_frame_error():
    rng = random.Random(20240601)
    prefixes = [b"", MAGIC, MAGIC + bytes([VERSION])] + [header(kind)[:4] for kind in Kind]
    for _ in range(2000):
        head = rng.choice(prefixes) + rng.randbytes(rng.randrange(0, 120))
        frames = [head] + [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.choice((0, 1, 1, 2)))]
        assert_decodes_or_frame_error(frames)


def test_random_garbage_after_a_valid_header_decodes_or_raises_frame_error():
    # past the header, every kind's body is random: FORWARD bodies get random row counts
    rng = random.Random(11)
    for _ in range(3000):
        kind = rng.choice(list(Kind))
        body = rng.randbytes(rng.choice((0, 1, 2, 3, 5, 8, 40, 83, 200)))
        frames = [header(kind) + body] + [rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.choice((0, 1)))]
        assert_decodes_or_frame_error(frames)


def test_single_byte_mutations_decode_or_raise_frame_error():
    rng = random.Random(7)
    encodings = valid_encodings()
    for _ in range(4000):
        frames = [bytearray(frame) for frame in rng.choice(encodings)]
        index = rng.randrange(len(frames)) if len(frames[-1]) else 0
        frame = frames[index]
        frame[rng.randrange(len(frame))] = rng.randrange(256)
        assert_decodes_or_frame_error([bytes(f) for f in frames])


def test_every_single_header_byte_of_a_batch_forward_mutated_decodes_or_raises_frame_error():
    # exhaustive for one multi-row FORWARD: every header byte, a few values each
    head, payload = (bytes(f) for f in encode(fwd(make_tensor((4, 1, 16)), rows=BATCH_ROWS, stage_ms=(0.5,))))
    for index in range(len(head)):
        for value in (0, 1, 2, 0x7F, 0x80, 0xFF, head[index] ^ 1):
            mutated = bytearray(head)
            mutated[index] = value
            assert_decodes_or_frame_error([bytes(mutated), payload])


def test_every_truncation_and_extension_decodes_or_raises_frame_error():
    for frames in valid_encodings():
        head = frames[0]
        for cut in range(len(head)):
            assert_decodes_or_frame_error([head[:cut], *frames[1:]])
        assert_decodes_or_frame_error([head + b"\0", *frames[1:]])
        assert_decodes_or_frame_error([head + bytes(ROW.size), *frames[1:]])
        assert_decodes_or_frame_error([head])
        assert_decodes_or_frame_error([head, b"\0" * 4])


def test_random_forward_headers_decode_or_raise_frame_error():
    rng = random.Random(99)

    def pick(valid, hostile):   # mostly valid fields, so that decoding gets past the first check
        return rng.choice(hostile if rng.random() < 0.1 else valid)

    temperatures = ([0.0, -0.0, 5e-324, 1e-300, 1e-5, 0.5, 1.0, 2.0],
                    [2.0000001, 5.0, -1.0, math.inf, -math.inf, math.nan])
    top_ps = ([5e-324, 1e-300, 1e-5, 0.5, 1.0], [0.0, -0.0, 1.0000001, 5.0, -1.0, math.inf, math.nan])
    small, huge = [0, 1, 2, 3, 8], [896, 2**16, 2**31, U32]
    outcomes = {"decoded": 0, "refused": 0}
    for _ in range(3000):
        ndim = pick((1, 2, 3), (0, 4, 255))
        count = pick((1, 1, 2, 3, 4, 7, 255), (0, U16))
        first = count if rng.random() < 0.8 else pick(small, huge)   # mostly consistent
        shape = tuple([first] + [pick(small, huge) for _ in range(ndim - 1)])[:ndim] if ndim <= 4 else ()
        code = pick((1, 2, 3, 4, 5), (0, 6, 255))
        size = math.prod(shape) * {1: 4, 2: 2, 3: 2, 4: 8, 5: 4}.get(code, 1) if shape else 0
        payload = (bytes(size) if size <= 2**16 and rng.random() < 0.8
                   else rng.randbytes(rng.randrange(64)))
        # the rows present: mostly `count` of them, sometimes one more or fewer; a full U16 of
        # rows is test_the_largest_batch_round_trips' (2.3 MB of rows per try would be slow)
        present = count if count <= 255 else rng.randrange(4)
        present = max(0, present + pick((0,), (-1, 1)))
        rows = tuple(raw_row(slot=pick((0, 1, U16), (2,)), position=pick((0, 1, U32), (2**31,)),
                             flags=pick((0, 1), (2, 3, 0x80, 255)), temperature=pick(*temperatures),
                             top_p=pick(*top_ps), top_k=pick((0, 1, 40, U32), (2**31,)),
                             seed=pick((0, 1, U64), (2**63,))) for _ in range(present))
        stage_ms = [pick((0.0, 0.5, 1e30), (math.nan, math.inf, -1.0)) for _ in range(rng.choice((0, 1, 3)))]
        head = forward_header(shape=shape, dtype_code=code, ndim=ndim, rows=rows, count=count,
                              stage_ms=stage_ms, stages=pick((None,), (0, 1, 2, 255)),
                              message_id=rng.choice((0, 1, U64)))
        try:
            decode([head, payload])
            outcomes["decoded"] += 1
        except FrameError:
            outcomes["refused"] += 1
        assert_decodes_or_frame_error([head, payload])
    assert outcomes["decoded"] > 300 and outcomes["refused"] > 300   # both paths really ran


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
        assert not inbox.authenticated and inbox.refused_peers == 0
        outbox.send(Ping(1))
        assert inbox.recv(timeout_ms=5000) == Ping(1)


def test_inbox_on_every_interface_advertises_the_given_host(context):
    with Inbox(context, host="0.0.0.0", advertise_host="127.0.0.1") as inbox:
        assert inbox.address == tcp_address("127.0.0.1", inbox.port)
        with Outbox(context, inbox.address) as outbox:
            outbox.send(Sampled(4, (11,)))
            assert inbox.recv(timeout_ms=5000) == Sampled(4, (11,))


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
        with pytest.raises(FrameError, match="needs one Row per tensor row"):
            outbox.send(fwd(torch.zeros(2, 4), rows=one_row()))
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


def test_order_is_preserved_across_kinds_and_interleaved_steps(context):
    sent = []
    for step in range(200):
        batch = 1 + step % 3
        rows = tuple(Row(slot, step, SAMPLED, sample=(step + slot) % 4 != 0) for slot in range(batch))
        sent.append(fwd(torch.full((batch, 1, 8), float(step)), step_id=step, rows=rows,
                        stage_ms=(0.5,) * (step % 4)))
        sent.append(Sampled(step, tuple(NO_TOKEN if not row.sample else step + row.slot for row in rows),
                            (1.0, 2.0)))
        if step % 50 == 49:
            sent += [Free(step, step % 3), Error(step, f"step {step}"), Ping(step)]
    sent.append(fwd(torch.randn(1, 300, 896), step_id=9, sample=False))   # a 1 MB prefill chunk
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
        raw.send_multipart([MAGIC + bytes([VERSION]), b"junk"])
        raw.send_multipart([header(Kind.PING, 8), b"x", b"y"])
        raw.send_multipart([forward_header(message_id=9), bytes(23)])
        raw.send_multipart([forward_header(message_id=10, rows=(raw_row(),) * 3), bytes(24)])
        raw.send_multipart([header(Kind.FREE, 11)])
        with pytest.raises(FrameError, match="shorter than"):
            inbox.recv(timeout_ms=5000)
        with pytest.raises(FrameError, match="1 or 2 frames, got 3"):
            inbox.recv(timeout_ms=5000)
        with pytest.raises(FrameError, match="has 23 bytes") as info:
            inbox.recv(timeout_ms=5000)
        assert info.value.message_id == 9   # a receiver can still answer step 9
        with pytest.raises(FrameError, match="3 rows but a tensor of 2") as info:
            inbox.recv(timeout_ms=5000)
        assert info.value.message_id == 10
        with pytest.raises(FrameError, match="FREE 11 has 0 body bytes") as info:
            inbox.recv(timeout_ms=5000)
        assert info.value.message_id == 11
        outbox.send(Ping(3))
        assert inbox.recv(timeout_ms=5000) == Ping(3)


def test_message_over_the_size_limit_is_dropped_and_the_inbox_keeps_working(context):
    # libzmq drops the connection of a peer that sends more than MAXMSGSIZE in one frame
    too_big = torch.empty(1, MAX_MESSAGE_BYTES // 4 + 1)   # uninitialised: cheap to allocate
    with Inbox(context) as inbox:
        with Outbox(context, inbox.address, send_timeout_ms=5000) as outbox:
            outbox.send(fwd(too_big))
            assert inbox.recv(timeout_ms=500) is None
        del too_big
        with Outbox(context, inbox.address, send_timeout_ms=5000) as outbox:
            outbox.send(Ping(4))
            assert inbox.recv(timeout_ms=5000) == Ping(4)


def stage_worker(inbox: Inbox, outbox: Outbox, scale: float, last: bool) -> None:
    """A toy stage: scales activations and records its time; the last one sends a Sampled (each
    sampling row's argmax, NO_TOKEN for the others); control messages pass on; it stops after
    SHUTDOWN."""
    while (msg := inbox.recv(timeout_ms=5000)) is not None:
        if isinstance(msg, Forward):
            hidden = msg.tensor * scale
            stage_ms = msg.stage_ms + (float(scale),)
            if last:
                token_ids = tuple(int(hidden[b].argmax()) if row.sample else NO_TOKEN
                                  for b, row in enumerate(msg.rows))
                msg = Sampled(msg.step_id, token_ids, stage_ms)
            else:
                msg = Forward(msg.step_id, msg.rows, hidden, stage_ms)
        outbox.send(msg)
        if isinstance(msg, Shutdown):
            return


def run_two_stage_pipeline(context, key: bytes | None) -> list:
    back, stage1_in, stage0_in = (Inbox(context, key=key) for _ in range(3))
    stage0_out = Outbox(context, stage1_in.address, key=key)
    stage1_out = Outbox(context, back.address, key=key)
    to_stage0 = Outbox(context, stage0_in.address, key=key)
    workers = [threading.Thread(target=stage_worker, args=(stage0_in, stage0_out, 2.0, False)),
               threading.Thread(target=stage_worker, args=(stage1_in, stage1_out, 3.0, True))]
    for worker in workers:
        worker.start()
    try:
        for step, slots in enumerate(((1,), (2,), (1, 2), (3, 1, 2))):
            hidden = torch.zeros(len(slots), 1, 4)
            for b, slot in enumerate(slots):
                hidden[b, 0, slot] = 1.0
            # slot 3 is a prefill chunk before its prompt's end: it does not sample yet
            rows = tuple(Row(slot, step, SAMPLED, sample=slot != 3) for slot in slots)
            to_stage0.send(fwd(hidden, step_id=step, rows=rows))
        to_stage0.send(Free(10, 1))
        to_stage0.send(Shutdown())
        received = [back.recv(timeout_ms=5000) for _ in range(6)]
    finally:
        for worker in workers:
            worker.join(timeout=10)
        for sock in (back, stage1_in, stage0_in, stage0_out, stage1_out, to_stage0):
            sock.close()
    return received


def test_two_stage_pipeline_over_threads(context):
    assert run_two_stage_pipeline(context, key=None) == [
        Sampled(0, (1,), (2.0, 3.0)), Sampled(1, (2,), (2.0, 3.0)), Sampled(2, (1, 2), (2.0, 3.0)),
        Sampled(3, (NO_TOKEN, 1, 2), (2.0, 3.0)), Free(10, 1), Shutdown()]


def test_two_stage_pipeline_with_authenticated_sockets(context):
    # as exo-lab runs it: every socket holds the data-plane key derived from the cluster secret
    key = derive_key(new_secret().encode(), "data-plane")
    assert run_two_stage_pipeline(context, key=key) == [
        Sampled(0, (1,), (2.0, 3.0)), Sampled(1, (2,), (2.0, 3.0)), Sampled(2, (1, 2), (2.0, 3.0)),
        Sampled(3, (NO_TOKEN, 1, 2), (2.0, 3.0)), Free(10, 1), Shutdown()]


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
            sent = [Sampled(i, (i, NO_TOKEN)[: 1 + i % 2], (float(i),)) for i in range(50)]
            sent += [fwd(torch.randn(1, 300, 896), step_id=5, sampling=SAMPLED, stage_ms=(1.0,)),
                     fwd(torch.randn(3, 1, 896), step_id=6, rows=BATCH_ROWS[:3]),
                     Error(1, "boom"), Free(2, 7), Ping(3), Shutdown()]
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
                    out.send(Sampled(msg.step_id, tuple(int(t) + 1 for t in msg.tensor[:, -1]), (0.5,)))
                    out.close(linger_ms=1000)

            worker = threading.Thread(target=stage)
            worker.start()
            await to_stage.send(fwd(torch.tensor([[41], [9]]), step_id=7))
            reply = await tokens_in.recv(timeout_ms=5000)
            await asyncio.to_thread(worker.join, 10)
            return reply

    assert asyncio.run(main()) == Sampled(7, (42, 10), (0.5,))


def test_async_authenticated_ends_round_trip():
    async def main(ctx):
        key = derive_key(new_secret().encode(), "data-plane")
        with AsyncInbox(ctx, key=key) as inbox, AsyncOutbox(ctx, inbox.address, key=key) as outbox:
            assert inbox.authenticated
            sent = [fwd(torch.randn(2, 1, 896), step_id=1, rows=BATCH_ROWS[:2]),
                    Sampled(1, (4, NO_TOKEN)), Free(2, 5)]
            for msg in sent:
                await outbox.send(msg)
            for msg in sent:
                assert_same(await inbox.recv(timeout_ms=5000), msg)

    run_async(main)


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
            await raw.send_multipart([header(Kind.SAMPLED, 6) + SAMPLED_BODY.pack(2, 0) + bytes(4)])
            with pytest.raises(FrameError, match="wrong length") as info:
                await inbox.recv(timeout_ms=5000)
            assert info.value.message_id == 6
            await outbox.send(Free(5, 1))
            assert await inbox.recv(timeout_ms=5000) == Free(5, 1)

    run_async(main)


# ------------------------------------------------------------------------ hop benchmark

@pytest.mark.parametrize("payload_bytes", [0, 16, 1001, 3584])
def test_measure_hop_overhead_returns_sane_numbers(payload_bytes):
    result = measure_hop_overhead(n=50, payload_bytes=payload_bytes, warmup=5)
    assert result["n"] == 50 and result["payload_bytes"] == payload_bytes
    for name in ("hop", "auth_hop", "pair"):
        median, p90 = result[f"{name}_median_ms"], result[f"{name}_p90_ms"]
        # positive, finite, p90 at or above the median, and below a second (a loopback hop)
        assert 0 < median <= p90 < 1000
    assert result["auth_added_ms"] == result["auth_hop_median_ms"] - result["hop_median_ms"]


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"n": -5}, {"payload_bytes": -1}], ids=str)
def test_measure_hop_overhead_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="need n >= 1 and payload_bytes >= 0"):
        measure_hop_overhead(**kwargs)


def test_inboxes_take_the_first_free_ports_of_the_range_and_say_when_it_is_used_up():
    """network.port_range's data ports, tried in order: a port another program holds is skipped;
    when every one is taken, the error names port_range and the fix."""
    from ports import free_port_range

    first = free_port_range(3)
    ports = (first, first + 1, first + 2)
    held = socket.socket()
    held.bind(("127.0.0.1", first))
    held.listen()
    inboxes = []
    try:
        inboxes = [Inbox(host="127.0.0.1", port=ports) for _ in range(2)]
        assert [inbox.port for inbox in inboxes] == [first + 1, first + 2]
        with pytest.raises(ClusterError, match=r"no free port for a data-plane inbox.*widen port_range"):
            Inbox(host="127.0.0.1", port=ports)
    finally:
        for inbox in inboxes:
            inbox.close()
        held.close()


# ------------------------------------------------------------------------ logit rules, logprobs, vectors, copy

from exo_lab.sampling import LogitRule, TokenLogprob   # noqa: E402

RULE_ROWS = (Row(0, 3, SAMPLED, rule=LogitRule(b"\x05\x00\x00\x80" * 3, ((2, -1.5), (70, 100.0))), logprobs=20),
             Row(1, 0, GREEDY, sample=False, embed=2), Row(2, 9, GREEDY, rule=LogitRule(bias=((7, 0.25),)), embed=1),
             Row(3, 1, GREEDY, rule=LogitRule(allowed=b""), logprobs=0))


def test_rules_logprobs_embed_and_copy_round_trip():
    msg = fwd(torch.tensor([[1], [2], [3], [4]]), rows=RULE_ROWS, stage_ms=(1.0,))
    received = round_trip(msg)
    assert received.rows == tuple(row_on_the_wire(row) for row in msg.rows) and received.rows[3].rule.allowed == b""
    vectors = torch.randn(3, 16)
    sampled = Sampled(5, (4, NO_TOKEN, 9), (2.0,),
                      (TokenLogprob(4, -0.25, ((4, -0.25), (8, -2.0))), None, TokenLogprob(9, 0.0)), vectors)
    back = round_trip(sampled)
    assert back == sampled and back.vectors.dtype == torch.float32 and torch.equal(back.vectors, vectors)
    assert round_trip(Sampled(5, (4, 5), logprobs=(None, None))).logprobs == ()   # none asked: ()
    assert round_trip(Copy(7, 0, U16, U32)) == Copy(7, 0, U16, U32)
    assert round_trip(Short(7, 3, 2**64 - 1, 1)) == Short(7, 3, 2**64 - 1, 1)


@pytest.mark.parametrize("make, message", [
    (lambda: fwd(torch.ones(1, 1), rows=(Row(0, 0, GREEDY, logprobs=21),)), "logprobs must be an int in \\[-1, 20\\]"),
    (lambda: fwd(torch.ones(1, 1), rows=(Row(0, 0, GREEDY, embed=3),)), "embed must be an int in \\[0, 2\\]"),
    (lambda: fwd(torch.ones(1, 1), rows=(Row(0, 0, GREEDY, rule="x"),)), "Row.rule must be a LogitRule"),
    (lambda: Sampled(1, (1,), logprobs=(TokenLogprob(1, 0.5),)), "logprob must be a float <= 0"),
    (lambda: Sampled(1, (1,), logprobs=(TokenLogprob(1, -1.0, ((2, -1.0),) * 21),)), "at most 20 alternatives"),
    (lambda: Sampled(1, (1, 2), logprobs=(None,)), "one per row"),
    (lambda: Sampled(1, (1,), vectors=torch.ones(2, 4)), "float32 tensor \\(rows=1"),
    (lambda: Sampled(1, (1,), vectors=torch.ones(1, 4, dtype=torch.float16)), "float32"),
    (lambda: Copy(1, U16 + 1, 0, 1), "src_slot"),
    (lambda: Copy(1, 0, 0, -1), "length"),
    (lambda: Short(1, 256, 0, 0), "stage"),
    (lambda: Short(1, 0, -1, 0), "free_bytes"),
])
def test_new_fields_the_wire_cannot_carry_are_refused_at_encode(make, message):
    with pytest.raises(FrameError, match=message):
        encode(make())


def rule_forward(extras, rules=b"", rows=1) -> list[bytes]:
    return [forward_header(shape=(rows, 1), rows=tuple(raw_row(slot=i) for i in range(rows)), extras=extras,
                           rules=rules), bytes(4 * rows)]


def logprob_frame(top: int, pairs, hidden=0, vectors=b"") -> bytes:
    return sampled_frame((5,), hidden=hidden, tail=bytes([top]) + b"".join(LOGPROB.pack(*p) for p in pairs) + vectors)


NEW_MALFORMED = {
    "logprobs-21": (rule_forward([(21, 0, 0, 0, 0)]), "logprobs 21"),
    "logprobs-minus-2": (rule_forward([(-2, 0, 0, 0, 0)]), "logprobs -2"),
    "embed-3": (rule_forward([(-1, 3, 0, 0, 0)]), "embed 3"),
    "rule-flag-3": (rule_forward([(-1, 0, 3, 0, 0)]), "flag 3"),
    "mask-without-flag": (rule_forward([(-1, 0, 1, 4, 0)], bytes(4)), "4 mask bytes"),
    "bias-without-rule": (rule_forward([(-1, 0, 0, 0, 1)], BIAS.pack(1, 1.0)), "1 bias entries"),
    "mask-not-words": (rule_forward([(-1, 0, 2, 3, 0)], bytes(3)), "3 mask bytes"),
    "mask-too-big": (rule_forward([(-1, 0, 2, 2**20 + 4, 0)]), "1048580 mask bytes"),
    "bias-too-many": (rule_forward([(-1, 0, 1, 0, 4097)]), "4097 bias entries"),
    "mask-truncated": (rule_forward([(-1, 0, 2, 8, 0)], bytes(4)), "rules are truncated"),
    "bias-truncated": (rule_forward([(-1, 0, 1, 0, 2)], BIAS.pack(1, 1.0)), "rules are truncated"),
    "rule-stray": (rule_forward([(-1, 0, 1, 0, 1)], BIAS.pack(1, 1.0) + b"\0"), "1 stray bytes"),
    "bias-nan": (rule_forward([(-1, 0, 1, 0, 1)], BIAS.pack(1, math.nan)), "must be a finite number"),
    "bias-no-token": (rule_forward([(-1, 0, 1, 0, 1)], BIAS.pack(NO_TOKEN, 1.0)), "bias must be an integer"),
    "bias-twice": (rule_forward([(-1, 0, 1, 0, 2)], BIAS.pack(1, 1.0) * 2), "names token 1 twice"),
    "extras-missing": (rule_forward([]), "its fields need at least"),
    "logprob-top-21": ([logprob_frame(21, [(1, -1.0)] * 22)], "21 alternatives"),
    "logprob-truncated": ([logprob_frame(2, [(1, -1.0)] * 2)], "truncated"),
    "logprob-positive": ([logprob_frame(0, [(1, 0.5)])], "float <= 0"),
    "logprob-nan": ([logprob_frame(0, [(1, math.nan)])], "float <= 0"),
    "logprob-no-token": ([logprob_frame(0, [(NO_TOKEN, -1.0)])], "float <= 0"),
    "logprobs-missing": ([sampled_frame((5,), tail=b"")], "wrong length"),
    "vectors-short": ([sampled_frame((5,), hidden=4, tail=b"\xff" + bytes(12))], "has 12 bytes"),
    "vectors-long": ([sampled_frame((5,), hidden=4, tail=b"\xff" + bytes(20))], "has 20 bytes"),
    "vectors-huge": ([sampled_frame((5,), hidden=2**31, tail=b"\xff")], "vectors over"),
    "copy-short": ([header(Kind.COPY) + bytes(7)], "COPY 42 has 7 body bytes, not 8"),
    "copy-stray": ([header(Kind.COPY) + bytes(9)], "COPY 42 has 9 body bytes"),
    "copy-payload": ([header(Kind.COPY) + bytes(8), b""], "carries a payload frame"),
}


@pytest.mark.parametrize("frames, message", NEW_MALFORMED.values(), ids=NEW_MALFORMED.keys())
def test_malformed_rules_logprobs_vectors_and_copies_are_frame_errors(frames, message):
    with pytest.raises(FrameError, match=message) as info:
        decode(frames)
    assert info.value.message_id == 42


def test_hand_built_rule_and_logprob_frames_decode():
    rules = b"\x01\x00\x00\x00" + BIAS.pack(3, -2.0) + BIAS.pack(9, 1.0)
    row = decode(rule_forward([(5, 2, 2, 4, 2)], rules)).rows[0]
    assert (row.rule, row.logprobs, row.embed) == (LogitRule(b"\x01\x00\x00\x00", ((3, -2.0), (9, 1.0))), 5, 2)
    got = decode([logprob_frame(1, [(5, -0.5), (5, -0.5)], hidden=2, vectors=struct.pack("<2f", 1.0, -2.0))])
    assert got.logprobs == (TokenLogprob(5, -0.5, ((5, -0.5),)),) and got.vectors.tolist() == [[1.0, -2.0]]


# ---------------------------------------------------------------------------- fine-tuning messages

from exo_lab.wire import TrainBackward, TrainForward, TrainLoss, TrainStep  # noqa: E402


def test_training_messages_round_trip_with_their_tensors():
    hidden = torch.randn(2, 5, 8)
    targets = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 7, -100]], dtype=torch.int32)
    forward = decode(encode(TrainForward(U64, 3, hidden, targets, 1 / 7)))
    assert (forward.batch_id, forward.micro, forward.scale) == (U64, 3, 1 / 7)
    assert torch.equal(forward.tensor, hidden) and torch.equal(forward.targets, targets)
    assert forward.targets.dtype == torch.int32 and msg_id(forward) == U64
    ids = decode(encode(TrainForward(9, 0, torch.tensor([[5, 6]]), torch.tensor([[6, -100]]), 0.5)))
    assert ids.tensor.dtype == torch.int64 and ids.targets.tolist() == [[6, -100]]
    grad = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    backward = decode(encode(TrainBackward(4, 1, grad)))
    assert (backward.batch_id, backward.micro) == (4, 1) and torch.equal(backward.tensor, grad)
    assert decode(encode(TrainLoss(4, 2, 3.25, 17))) == TrainLoss(4, 2, 3.25, 17)
    assert decode(encode(TrainStep(4, 3, 1, 0.5, 2e-4))) == TrainStep(4, 3, 1, 0.5, 2e-4)
    # the layout of the small ones, byte by byte
    assert encode(TrainLoss(1, 2, 0.5, 3)) == [b"EX\x07\x0c" + (1).to_bytes(8, "little") + b"\x02\x00"
                                               + struct.pack("<d", 0.5) + (3).to_bytes(4, "little")]
    assert encode(TrainStep(1, 2, 0, 0.0, 1.0)) == [b"EX\x07\x0d" + (1).to_bytes(8, "little") + b"\x02\x00\x00"
                                                    + struct.pack("<d", 0.0) + struct.pack("<d", 1.0)]


@pytest.mark.parametrize("message, error", [
    (lambda: TrainForward(1, 0, torch.zeros(2, 3), torch.zeros(3, 2), 1.0), "targets must be a tensor of shape"),
    (lambda: TrainForward(1, 0, torch.zeros(2, 3), torch.zeros(2, 3), float("nan")), "scale must be a finite"),
    (lambda: TrainForward(1, 0, torch.zeros(3), torch.zeros(3), 1.0), "a training tensor is (B, T, ...)"),
    (lambda: TrainLoss(1, 0, float("inf"), 3), "loss must be a finite"),
    (lambda: TrainStep(1, 2, 2, 0.0, 1.0), "phase must be an int in [0, 1]"),
    (lambda: TrainBackward(1, 70000, torch.zeros(1, 1, 2)), "micro must be an int"),
])
def test_bad_training_messages_fail_at_encode(message, error):
    with pytest.raises(FrameError, match=re.escape(error)):
        encode(message())


def test_malformed_training_frames_are_refused():
    good = encode(TrainForward(5, 0, torch.zeros(1, 2, 4), torch.zeros(1, 2, dtype=torch.int32), 1.0))
    head = bytes(good[0])
    with pytest.raises(FrameError, match="payload of message 5"):
        decode([head[:-4], good[1]])                  # targets cut short
    with pytest.raises(FrameError, match="has no payload frame"):
        decode([head])
    with pytest.raises(FrameError, match="TRAIN_LOSS 1 has 3 body bytes"):
        decode([bytes(encode(TrainLoss(1, 0, 1.0, 1))[0])[:-11]])
    row = Row(0, 0, GREEDY, adapter=70000)
    with pytest.raises(FrameError, match="adapter must be an int"):
        encode(fwd(torch.tensor([[1]]), rows=(row,)))
    assert decode(encode(fwd(torch.tensor([[1]]), rows=(Row(0, 0, GREEDY, adapter=3),)))).rows[0].adapter == 3
