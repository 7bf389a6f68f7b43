"""The authenticated data plane: CurveZMQ keys from the cluster secret, a ZAP check of the
client key, and refusals reported like malformed messages."""
from __future__ import annotations

import asyncio
import time

import pytest
import zmq

from exo_lab.security import derive_key
from exo_lab.wire import AsyncInbox, AsyncOutbox, FrameError, Inbox, Outbox, Ping, encode
from exo_lab.wire.auth import CurveKeys

KEY = derive_key(b"the cluster secret for these tests", "data-plane")
OTHER_KEY = derive_key(b"another cluster's secret, not ours", "data-plane")


@pytest.fixture
def context():
    made = zmq.Context()
    yield made
    made.term()      # would hang if a socket or the ZAP handler were left open


def recv_refusal(inbox, timeout_s: float = 5.0) -> str:
    """Poll until the inbox reports a refused peer; returns the report."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            assert inbox.recv(timeout_ms=50) is None, "a message got through"
        except FrameError as exc:
            return str(exc)
    raise AssertionError("no refusal was reported")


def test_peers_with_the_key_talk(context):
    with Inbox(context, key=KEY) as inbox, Outbox(context, inbox.address, key=KEY) as outbox:
        assert inbox.authenticated
        outbox.send(Ping(41))
        assert inbox.recv(timeout_ms=5000) == Ping(41)


def test_keys_are_derived_the_same_way_everywhere():
    assert CurveKeys.from_key(KEY) == CurveKeys.from_key(bytes(KEY))
    assert CurveKeys.from_key(KEY).domain != CurveKeys.from_key(OTHER_KEY).domain
    with pytest.raises(ValueError):
        CurveKeys.from_key(b"short")


@pytest.mark.parametrize("sender_key", [OTHER_KEY, None], ids=["other-secret", "plain-zmq"])
def test_a_peer_without_the_secret_is_refused_and_counted(context, sender_key):
    with Inbox(context, key=KEY) as inbox:
        with Outbox(zmq.Context.instance(), inbox.address, key=sender_key, send_timeout_ms=300) as outbox:
            try:
                outbox.send(Ping(1))
            except Exception:
                pass       # with another secret no connection comes up: the send times out
            assert "without the cluster secret" in recv_refusal(inbox)
        assert inbox.refused_peers >= 1
        with Outbox(context, inbox.address, key=KEY) as friend:    # the inbox goes on serving
            friend.send(Ping(2))
            assert inbox.recv(timeout_ms=5000) == Ping(2)


def test_zap_refuses_a_client_that_knows_only_the_server_key(context):
    """CURVE alone authenticates only the server; ZAP checks the client key too."""
    with Inbox(context, key=KEY) as inbox:
        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.linger = 0
        public, secret = zmq.curve_keypair()
        sock.curve_serverkey = CurveKeys.from_key(KEY).server_public
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.connect(inbox.address)
        sock.send_multipart(encode(Ping(3)))
        try:
            assert "refused 1 connection" in recv_refusal(inbox)
        finally:
            sock.close()


def test_garbage_bytes_on_the_port_never_arrive(context):
    import socket

    with Inbox(context, key=KEY) as inbox:
        port = int(inbox.address.rsplit(":", 1)[1])
        for garbage in (b"EX" + b"[" * 200_000, b"\xff" + bytes(9) + b"\x7f\x03\x00NULL" + bytes(1000)):
            with socket.create_connection(("127.0.0.1", port)) as raw:
                raw.sendall(garbage)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                assert inbox.recv(timeout_ms=50) is None
            except FrameError:
                pass       # a ZMTP handshake that failed is reported; bytes that are not ZMTP just close
        with Outbox(context, inbox.address, key=KEY) as friend:
            friend.send(Ping(4))
            assert inbox.recv(timeout_ms=5000) == Ping(4)


def test_two_clusters_in_one_process_stay_apart(context):
    with Inbox(context, key=KEY) as ours, Inbox(context, key=OTHER_KEY) as theirs, \
            Outbox(context, ours.address, key=KEY) as to_ours, \
            Outbox(context, theirs.address, key=OTHER_KEY) as to_theirs:
        to_ours.send(Ping(10))
        to_theirs.send(Ping(20))
        assert ours.recv(timeout_ms=5000) == Ping(10)
        assert theirs.recv(timeout_ms=5000) == Ping(20)
    # a context with no keyed inbox left has no ZAP handler: a new one starts cleanly
    with Inbox(context, key=KEY) as again, Outbox(context, again.address, key=KEY) as outbox:
        outbox.send(Ping(30))
        assert again.recv(timeout_ms=5000) == Ping(30)


def test_async_ends_authenticate_too():
    async def main():
        inbox = AsyncInbox(key=KEY)
        outbox = AsyncOutbox(None, inbox.address, key=KEY)
        try:
            await outbox.send(Ping(7))
            assert await inbox.recv(timeout_ms=5000) == Ping(7)
        finally:
            inbox.close()
            outbox.close()

    asyncio.run(main())


def test_authentication_adds_less_than_50_microseconds_per_hop():
    from exo_lab.bench import measure_hop_overhead

    result = measure_hop_overhead(n=300, payload_bytes=3584, warmup=50)
    assert result["auth_hop_median_ms"] > 0
    # the goal is < 0.05 ms; a shared CI machine gets some slack
    assert result["auth_added_ms"] < 0.15, result
