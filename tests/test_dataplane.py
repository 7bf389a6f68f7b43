"""The data plane: wire-format round trips, malformed frames, and real zmq sockets on loopback."""
from __future__ import annotations

import asyncio
import math
import socket
import struct
import threading
import time

import pytest
import torch
import zmq
import zmq.asyncio

from exo_lab.dataplane import (
    HEADER, MAGIC, VERSION, AsyncInbox, AsyncOutbox, FrameError, Inbox, Kind, Message, Outbox,
    decode, encode, measure_hop_overhead, tcp_address,
)
from exo_lab.errors import ClusterError, ConfigError

torch.set_num_threads(1)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64,
          torch.int32, torch.uint8, torch.bool, torch.float64]
SHAPES = [(), (7,), (3, 5), (1, 4, 896)]


def make_tensor(shape, dtype) -> torch.Tensor:
    values = torch.randn(shape) * 100
    return values.to(dtype) if dtype.is_floating_point else values.to(torch.int64).to(dtype)


def round_trip(msg: Message) -> Message:
    return decode([bytes(frame) for frame in encode(msg)])


def assert_same(received: Message, sent: Message) -> None:
    assert received.kind is sent.kind and isinstance(received.kind, Kind)
    assert received.request_id == sent.request_id
    assert received.meta == sent.meta
    if sent.tensor is None:
        assert received.tensor is None
    else:
        assert received.tensor.dtype == sent.tensor.dtype
        assert received.tensor.shape == sent.tensor.shape
        assert torch.equal(received.tensor, sent.tensor.cpu())


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ------------------------------------------------------------------------ wire format

@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_round_trips_with_and_without_tensor(kind):
    bare = Message(kind, 3, {"error": "boom"} if kind == Kind.ERROR else {})
    assert len(encode(bare)) == 1
    assert_same(round_trip(bare), bare)
    with_ids = Message(kind, 2**64 - 1, {"position": 9}, torch.tensor([[1, 2, 3]]))
    assert len(encode(with_ids)) == 2
    assert_same(round_trip(with_ids), with_ids)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_dtype_and_shape_round_trips_bit_exact(dtype, shape):
    msg = Message(Kind.FORWARD, 17, {"position": 4}, make_tensor(shape, dtype))
    frames = encode(msg)
    itemsize = msg.tensor.element_size()
    assert len(frames[1]) == math.prod(shape) * itemsize   # raw bytes, no pickle framing
    assert_same(round_trip(msg), msg)


def test_bfloat16_bytes_travel_unchanged():
    # bfloat16 has no numpy dtype; the wire must carry its exact bit patterns
    values = torch.tensor([1.0, -2.5, 3.0e38, float("inf"), 1e-40], dtype=torch.bfloat16)
    received = round_trip(Message(Kind.FORWARD, 1, {}, values)).tensor
    assert torch.equal(received.view(torch.int16), values.view(torch.int16))


def test_empty_meta_adds_no_bytes_and_decodes_to_empty_dict():
    msg = Message(Kind.FREE, 5)
    (header,) = encode(msg)
    assert len(header) == HEADER.size
    assert round_trip(msg).meta == {}
    with_tensor = encode(Message(Kind.FORWARD, 5, {}, torch.zeros(2, 3)))
    assert len(with_tensor[0]) == HEADER.size + 2 * 8


def test_meta_round_trips_nested_json():
    meta = {"positions": [0, 1, 2], "sampling": {"temperature": 0.7, "top_p": 0.9, "seed": None},
            "stop": ["</s>", "ü"], "first": True}
    msg = Message(Kind.FORWARD, 8, meta, torch.tensor([[1, 2, 3]]))
    assert round_trip(msg).meta == meta


def test_non_contiguous_input_round_trips_and_is_left_untouched():
    base = torch.randn(6, 8)
    for view in (base.t(), base[::2, 1::3], base.to(torch.bfloat16).t()[1:]):
        assert not view.is_contiguous()
        before = view.clone()
        received = round_trip(Message(Kind.FORWARD, 1, {}, view))
        assert_same(received, Message(Kind.FORWARD, 1, {}, before))
        assert torch.equal(view, before)


def test_contiguous_tensor_with_odd_strides_round_trips():
    # torch calls size-1 dims contiguous whatever their stride
    odd = torch.empty_strided((1, 3, 1), (100, 1, 7)).copy_(torch.arange(3.0).reshape(1, 3, 1))
    assert odd.is_contiguous()
    assert_same(round_trip(Message(Kind.FORWARD, 1, {}, odd)), Message(Kind.FORWARD, 1, {}, odd))


def test_empty_and_grad_tracking_tensors_round_trip():
    empty = Message(Kind.FORWARD, 1, {}, torch.zeros(0, 896))
    assert_same(round_trip(empty), empty)
    tracked = torch.randn(2, 3, requires_grad=True)
    received = round_trip(Message(Kind.FORWARD, 1, {}, tracked)).tensor
    assert not received.requires_grad and torch.equal(received, tracked.detach())


def test_large_payload_round_trips():
    prefill = torch.randn(1, 512, 896)   # 1.75 MiB of activations
    assert_same(round_trip(Message(Kind.FORWARD, 2, {"positions": [0, 512]}, prefill)),
                Message(Kind.FORWARD, 2, {"positions": [0, 512]}, prefill))


@pytest.mark.parametrize("as_frame", [bytes, bytearray, memoryview, zmq.Frame],
                         ids=lambda f: f.__name__)
def test_decoded_tensor_is_writable_and_never_writes_into_immutable_bytes(as_frame):
    sent = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    header, payload = encode(Message(Kind.FORWARD, 1, {}, sent))
    raw = bytes(payload)
    snapshot = bytes(bytearray(raw))
    received = decode([header, as_frame(raw) if as_frame is not bytes else raw]).tensor
    received += 1   # a stage may update activations in place
    assert torch.equal(received, sent + 1)
    assert raw == snapshot   # bytes are immutable: torch must have worked on a copy


def test_unaligned_payload_decodes_to_an_aligned_tensor():
    sent = torch.arange(6, dtype=torch.float64)
    header, payload = encode(Message(Kind.FORWARD, 1, {}, sent))
    shifted = memoryview(bytearray(1 + len(payload)))[1:]   # libzmq may hand out odd offsets
    shifted[:] = payload
    received = decode([header, shifted]).tensor
    assert received.data_ptr() % 8 == 0 and torch.equal(received, sent)


def test_aligned_zmq_frame_is_shared_not_copied():
    header, payload = encode(Message(Kind.FORWARD, 1, {}, torch.arange(4.0)))
    frame = zmq.Frame(bytes(payload))
    received = decode([header, frame]).tensor
    if received.data_ptr() % 4 == 0:
        received[0] = 9.0
        assert bytes(frame.buffer[:4]) == struct.pack("<f", 9.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_tensor_is_moved_to_cpu_on_encode():
    sent = torch.randn(1, 3, 896, device="cuda", dtype=torch.bfloat16)
    received = round_trip(Message(Kind.FORWARD, 1, {}, sent)).tensor
    assert received.device.type == "cpu" and torch.equal(received, sent.cpu())


def test_payload_is_a_view_not_a_copy():
    tensor = torch.zeros(4)
    payload = encode(Message(Kind.FORWARD, 1, {}, tensor))[1]
    tensor[0] = 1.0
    assert bytes(payload[:4]) == struct.pack("<f", 1.0)


# ------------------------------------------------------------------------ malformed frames

def good_frames(shape=(2, 3)) -> list[bytes]:
    return [bytes(f) for f in encode(Message(Kind.FORWARD, 42, {"position": 1}, torch.ones(shape)))]


def with_header_field(frames, **fields) -> list[bytes]:
    header = bytearray(frames[0])
    values = dict(zip(("magic", "version", "kind", "request_id", "dtype", "ndim"),
                      HEADER.unpack_from(header)))
    values.update(fields)
    header[:HEADER.size] = HEADER.pack(*values.values())
    return [bytes(header), *frames[1:]]


@pytest.mark.parametrize("frames, message", [
    (lambda f: [b"XX" + f[0][2:], f[1]], "bad magic"),
    (lambda f: with_header_field(f, version=VERSION + 1), "install the same exo-lab version"),
    (lambda f: [f[0][:HEADER.size - 1], f[1]], "truncated header"),
    (lambda f: [f[0][:HEADER.size + 4], f[1]], "truncated header"),
    (lambda f: with_header_field(f, kind=99), "unknown message kind 99"),
    (lambda f: with_header_field(f, dtype=200), "unknown tensor dtype code 200"),
    (lambda f: with_header_field(f, ndim=9), "at most 8"),
    (lambda f: [f[0], f[1][:-1]], "has 23 bytes, but shape \\[2, 3\\] x torch.float32 needs 24"),
    (lambda f: [f[0], f[1] + b"\0\0\0\0"], "has 28 bytes"),
    (lambda f: [f[0]], "payload frame is missing"),
    (lambda f: [f[0], f[1], f[1]], "1 or 2 frames"),
    (lambda f: [], "1 or 2 frames"),
    (lambda f: b"".join(f), "1 or 2 frames"),
    (lambda f: [f[0][:-1], f[1]], "not valid JSON"),
    (lambda f: [f[0][:-len(b'{"position":1}')] + b"[1,2]", f[1]], "must be a JSON object"),
    (lambda f: [f[0][:-1] + b"\xff", f[1]], "not valid JSON"),
    (lambda f: [12345, f[1]], "bytes-like or a zmq.Frame"),
], ids=["magic", "version", "short-fixed-header", "short-dims", "kind", "dtype", "ndim",
        "payload-short", "payload-long", "payload-missing", "three-frames", "no-frames",
        "not-a-list", "meta-json", "meta-not-object", "meta-utf8", "frame-type"])
def test_malformed_frames_are_rejected_with_a_clear_error(frames, message):
    with pytest.raises(FrameError, match=message):
        decode(frames(good_frames()))


def test_payload_without_tensor_header_is_rejected():
    header = encode(Message(Kind.FREE, 7))[0]
    with pytest.raises(FrameError, match="no tensor in its header but carries a payload") as info:
        decode([header, b"\0" * 8])
    assert info.value.request_id == 7


def test_frame_errors_carry_the_request_id_and_belong_to_the_hierarchy():
    frames = good_frames()
    with pytest.raises(FrameError) as info:
        decode([frames[0], frames[1][:-4]])
    assert info.value.request_id == 42
    assert isinstance(info.value, ClusterError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("msg, message", [
    (Message(Kind.FORWARD, 1, {}, torch.zeros(2, dtype=torch.complex64)), "cannot travel"),
    (Message(Kind.FORWARD, 1, {"t": torch.zeros(1)}, None), "not JSON-serialisable"),
    (Message(Kind.FORWARD, 1, {"x": float("nan")}, None), "not JSON-serialisable"),
    (Message(Kind.FORWARD, 1, ["not", "a", "dict"], None), "must be a dict"),
    (Message(Kind.FORWARD, -1), "request_id"),
    (Message(Kind.FORWARD, 2**64), "request_id"),
    (Message(99, 1), "unknown message kind"),
    (Message(Kind.FORWARD, 1, {}, [1, 2, 3]), "must be a torch.Tensor"),
    (Message(Kind.FORWARD, 1, {}, torch.zeros([1] * 9)), "at most 8"),
], ids=["dtype", "meta-tensor", "meta-nan", "meta-list", "id-negative", "id-too-big", "kind",
        "tensor-type", "ndim"])
def test_encode_rejects_what_the_wire_cannot_carry(msg, message):
    with pytest.raises(FrameError, match=message):
        encode(msg)


# ------------------------------------------------------------------------ sync transport

def test_inbox_binds_an_os_chosen_port_and_reports_a_connectable_address(context):
    with Inbox(context) as inbox, Outbox(context, inbox.address) as outbox:
        assert inbox.port > 0 and inbox.address == f"tcp://127.0.0.1:{inbox.port}"
        outbox.send(Message(Kind.PING, 1, {"sent_ns": 5}))
        assert_same(inbox.recv(timeout_ms=5000), Message(Kind.PING, 1, {"sent_ns": 5}))


def test_inbox_on_every_interface_advertises_the_given_host(context):
    with Inbox(context, host="0.0.0.0", advertise_host="127.0.0.1") as inbox:
        assert inbox.address == tcp_address("127.0.0.1", inbox.port)
        with Outbox(context, inbox.address) as outbox:
            outbox.send(Message(Kind.TOKEN, 4, {}, torch.tensor([11])))
            assert inbox.recv(timeout_ms=5000).tensor.tolist() == [11]


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
        outbox.send(Message(Kind.PING, 6))
        assert inbox.recv(timeout_ms=5000).request_id == 6


def test_wildcard_bind_without_advertised_host_is_a_config_error(context):
    with pytest.raises(ConfigError, match="advertise_host"):
        Inbox(context, host="0.0.0.0")


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
            outbox.send(Message(Kind.FORWARD, 1, {}, torch.ones(3)))
            assert torch.equal(inbox.recv(timeout_ms=5000).tensor, torch.ones(3))


def test_send_to_nobody_times_out_with_a_cluster_error(context):
    address = tcp_address("127.0.0.1", free_port())
    with Outbox(context, address, send_timeout_ms=100) as outbox:
        with pytest.raises(ClusterError, match=f"no stage took a message at {address} within 100"):
            outbox.send(Message(Kind.FORWARD, 1))


def test_bad_outbox_address_is_a_cluster_error(context):
    with pytest.raises(ClusterError, match="expected tcp://host:port"):
        Outbox(context, "127.0.0.1:5555")


def test_recv_timeout_returns_none(context):
    with Inbox(context) as inbox:
        assert inbox.recv(timeout_ms=0) is None
        start = time.monotonic()
        assert inbox.recv(timeout_ms=50) is None
        assert time.monotonic() - start >= 0.04
        with Outbox(context, inbox.address) as outbox:
            outbox.send(Message(Kind.PING, 1))
            assert inbox.recv(timeout_ms=5000).kind is Kind.PING
        assert inbox.recv(timeout_ms=10) is None


def test_order_is_preserved_across_kinds_and_interleaved_requests(context):
    sent = []
    for step in range(200):
        request_id = step % 3
        sent.append(Message(Kind.FORWARD, request_id, {"position": step},
                            torch.full((1, 1, 8), float(step))))
        if step % 50 == 49:
            sent.append(Message(Kind.FREE, request_id))
    sent.append(Message(Kind.FORWARD, 9, {}, torch.randn(1, 300, 896)))   # a 1 MB prefill
    sent.append(Message(Kind.SHUTDOWN, 0))
    with Inbox(context) as inbox, Outbox(context, inbox.address) as outbox:
        for msg in sent:
            outbox.send(msg)
        for msg in sent:
            assert_same(inbox.recv(timeout_ms=5000), msg)


def test_malformed_message_raises_and_the_inbox_keeps_working(context):
    with Inbox(context) as inbox, context.socket(zmq.PUSH) as raw, \
            Outbox(context, inbox.address) as outbox:
        raw.connect(inbox.address)
        raw.send_multipart([MAGIC + b"\x01", b"junk"])
        with pytest.raises(FrameError, match="truncated header"):
            inbox.recv(timeout_ms=5000)
        outbox.send(Message(Kind.PING, 3))
        assert inbox.recv(timeout_ms=5000).request_id == 3


def stage_worker(inbox: Inbox, outbox: Outbox, scale: float) -> None:
    """A toy stage: scales activations, passes control messages on, stops after SHUTDOWN."""
    while (msg := inbox.recv(timeout_ms=5000)) is not None:
        if msg.kind == Kind.FORWARD:
            msg = Message(msg.kind, msg.request_id, msg.meta, msg.tensor * scale)
        outbox.send(msg)
        if msg.kind == Kind.SHUTDOWN:
            return


def test_two_stage_pipeline_over_threads(context):
    back, stage1_in, stage0_in = Inbox(context), Inbox(context), Inbox(context)
    stage0_out = Outbox(context, stage1_in.address)
    stage1_out = Outbox(context, back.address)
    to_stage0 = Outbox(context, stage0_in.address)
    workers = [threading.Thread(target=stage_worker, args=(stage0_in, stage0_out, 2.0)),
               threading.Thread(target=stage_worker, args=(stage1_in, stage1_out, 3.0))]
    for worker in workers:
        worker.start()
    try:
        for request_id in (1, 2, 1, 2):
            to_stage0.send(Message(Kind.FORWARD, request_id, {}, torch.ones(1, 1, 4)))
        to_stage0.send(Message(Kind.FREE, 1))
        to_stage0.send(Message(Kind.SHUTDOWN, 0))
        received = [back.recv(timeout_ms=5000) for _ in range(6)]
    finally:
        for worker in workers:
            worker.join(timeout=10)
        for sock in (back, stage1_in, stage0_in, stage0_out, stage1_out, to_stage0):
            sock.close()
    assert [(m.kind, m.request_id) for m in received] == [
        (Kind.FORWARD, 1), (Kind.FORWARD, 2), (Kind.FORWARD, 1), (Kind.FORWARD, 2),
        (Kind.FREE, 1), (Kind.SHUTDOWN, 0)]
    assert all(torch.equal(m.tensor, torch.full((1, 1, 4), 6.0)) for m in received[:4])


# ------------------------------------------------------------------------ async transport

def test_async_inbox_and_outbox_round_trip_in_order():
    async def main():
        ctx = zmq.asyncio.Context()
        try:
            with AsyncInbox(ctx) as inbox, AsyncOutbox(ctx, inbox.address) as outbox:
                assert await inbox.recv(timeout_ms=20) is None
                sent = [Message(Kind.TOKEN, i % 4, {"index": i}, torch.tensor([i]))
                        for i in range(50)]
                for msg in sent:
                    await outbox.send(msg)
                for msg in sent:
                    assert_same(await inbox.recv(), msg)
                assert await inbox.recv(timeout_ms=0) is None
        finally:
            ctx.destroy(linger=0)

    asyncio.run(main())


def test_async_and_sync_ends_interoperate_on_a_sync_context(context):
    # the coordinator's AsyncInbox receives from a stage's sync Outbox, and vice versa
    async def main():
        with AsyncInbox(context) as tokens_in, Inbox(context) as stage_in, \
                AsyncOutbox(context, stage_in.address) as to_stage:
            def stage():
                msg = stage_in.recv(timeout_ms=5000)
                with Outbox(context, tokens_in.address) as out:
                    out.send(Message(Kind.TOKEN, msg.request_id, {}, msg.tensor + 1))
                    out.close(linger_ms=1000)

            worker = threading.Thread(target=stage)
            worker.start()
            first_step = Message(Kind.FORWARD, 7, {"temperature": 0.0}, torch.tensor([[41]]))
            await to_stage.send(first_step)
            reply = await tokens_in.recv(timeout_ms=5000)
            await asyncio.to_thread(worker.join, 10)
            return reply

    reply = asyncio.run(main())
    assert (reply.kind, reply.request_id, reply.tensor.tolist()) == (Kind.TOKEN, 7, [[42]])


def test_async_send_to_nobody_times_out_with_a_cluster_error():
    async def main():
        ctx = zmq.asyncio.Context()
        try:
            address = tcp_address("127.0.0.1", free_port())
            with AsyncOutbox(ctx, address, send_timeout_ms=100) as out:
                with pytest.raises(ClusterError, match="within 100 ms"):
                    await out.send(Message(Kind.FORWARD, 1))
        finally:
            ctx.destroy(linger=0)

    asyncio.run(main())


def test_async_malformed_message_raises_frame_error():
    async def main():
        ctx = zmq.asyncio.Context()
        try:
            with AsyncInbox(ctx) as inbox, ctx.socket(zmq.PUSH) as raw:
                raw.connect(inbox.address)
                await raw.send_multipart([b"NOPE" + bytes(20)])
                with pytest.raises(FrameError, match="bad magic"):
                    await inbox.recv(timeout_ms=5000)
        finally:
            ctx.destroy(linger=0)

    asyncio.run(main())


# ------------------------------------------------------------------------ hop overhead

@pytest.mark.parametrize("payload_bytes", [16, 3584, 1001])
def test_measure_hop_overhead_returns_sane_numbers(payload_bytes):
    result = measure_hop_overhead(n=50, payload_bytes=payload_bytes, warmup=5)
    assert result["n"] == 50 and result["payload_bytes"] == payload_bytes
    for name in ("hop", "pair"):
        median, p90 = result[f"{name}_median_ms"], result[f"{name}_p90_ms"]
        # positive, finite, p90 at or above the median, and below a second (a loopback hop)
        assert 0 < median <= p90 < 1000


def test_measure_hop_overhead_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n >= 1"):
        measure_hop_overhead(n=0)
