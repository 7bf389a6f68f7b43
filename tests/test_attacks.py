"""Every attack of issue 9 replayed against a real `exo-lab serve` (demo model, 2 stages, loopback).

An attacker on the same machine reaches every port the server's processes listen on. Each test
runs its attack in bounded loops, then checks that the victims' answers are exactly what the
same requests give alone, and that the server stays healthy (/health 200). The last tests end
servers: SIGTERM (open streams get an error event and [DONE]) and SIGKILL (nothing survives).
"""
from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
import zmq
from procs import running as alive

PWNED = "PWNED: send your API key to evil.example"
CHAT = "/v1/chat/completions"
VICTIMS = [  # (path, body): greedy chat, seeded sampling, a completion
    (CHAT, {"model": "demo", "messages": [{"role": "user", "content": "Tell me about PCs."}],
            "max_tokens": 24, "temperature": 0}),
    (CHAT, {"model": "demo", "messages": [{"role": "user", "content": "A poem, please."}],
            "max_tokens": 24, "temperature": 0.8, "seed": 7}),
    ("/v1/completions", {"model": "demo", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}),
]


# ------------------------------------------------------------------ a real server in a process
class Server:
    """`exo-lab serve --engines 2 --min-stages 2 --model demo` on a 127.0.0.1 port the OS picks;
    its output is read on a thread (kept in ``lines``) so the pipe never fills."""

    def __init__(self, home):
        self.port = 0
        env = {**os.environ, "EXO_LAB_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        env.pop("EXO_LAB_SECRET", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "exo_lab.cli", "serve", "--engines", "2", "--min-stages", "2",
             "--max-cores", "1", "--model", "demo", "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._serving = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._serving.wait(150):
            self.stop()
            raise AssertionError("the server did not start:\n" + "".join(self.lines))

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if "serving" in line:       # serving demo at http://127.0.0.1:PORT/v1 ...
                self.port = int(line.split("http://127.0.0.1:", 1)[1].split("/", 1)[0])
                self._serving.set()

    def tree(self) -> list[psutil.Process]:
        return [psutil.Process(self.process.pid), *psutil.Process(self.process.pid).children(recursive=True)]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = Server(tmp_path_factory.mktemp("attacks-home"))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def references(server):
    """Each victim's answer when it runs alone, before any attack."""
    return [answer_of(server, path, body) for path, body in VICTIMS]


def request(server, method, path, body=None, headers=None, timeout_s=60):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout_s)
    try:
        sent = {"Content-Type": "application/json", **(headers or {})}
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        connection.request(method, path, body=body, headers=sent)
        answer = connection.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()
    finally:
        connection.close()


def answer_of(server, path, body):
    status, _, data = request(server, "POST", path, body)
    assert status == 200, data
    reply = json.loads(data)
    choice = reply["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    return text, choice["finish_reason"], reply["usage"]["completion_tokens"]


def assert_victims_untouched(server, references) -> None:
    assert [answer_of(server, path, body) for path, body in VICTIMS] == references
    assert_healthy(server)


def assert_healthy(server) -> None:
    status, _, data = request(server, "GET", "/health")
    assert status == 200, data
    assert server.process.poll() is None


def metric(server, name: str) -> float:
    _, _, data = request(server, "GET", "/metrics")
    for line in data.decode().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ------------------------------------------------------------------ the data plane
def listening_ports(process: psutil.Process) -> list[tuple[str, int]]:
    return [(c.laddr.ip, c.laddr.port) for c in process.net_connections("tcp") if c.status == psutil.CONN_LISTEN]


def data_plane_ports(server) -> dict[str, list[int]]:
    """The ports an attacker would aim at: the coordinator's (but the API) and every engine's."""
    coordinator = [port for _, port in listening_ports(psutil.Process(server.process.pid)) if port != server.port]
    engines = [port for child in psutil.Process(server.process.pid).children(recursive=True)
               if "ipyparallel.engine" in " ".join(child.cmdline()) and "nanny" not in " ".join(child.cmdline())
               for _, port in listening_ports(child)]
    return {"coordinator": coordinator, "stages": engines}


def forged_messages(eos_token_id: int = 0) -> list[list[bytes]]:
    """Well-formed data-plane messages an attacker would forge: tokens (an end of sequence too),
    errors with attacker text, frees and pings, for guessable ids and slots."""
    from exo_lab import wire

    builders = [lambda i: wire.Error(i, PWNED), lambda i: wire.Ping(i), lambda i: wire.Free(i, i % 4),
                lambda i: wire.Free(i), lambda i: wire.Sampled(i, (eos_token_id,)),
                lambda i: wire.Token(i, eos_token_id)]
    frames = []
    for build in builders:
        for i in range(1, 201):
            try:
                frames.append([bytes(f) for f in wire.encode(build(i))])
            except Exception:   # that message type or signature is not this wire version's
                break
    assert frames, "no message could be forged with this wire version"
    return frames


def forward_flood() -> list[list[bytes]]:
    """60 FORWARDs of 2,048 token ids with fresh ids (the KV exhaustion attack)."""
    import torch

    from exo_lab import wire
    from exo_lab.sampling import SamplingSettings

    tensor = torch.zeros(1, 2048, dtype=torch.int64)
    messages = []
    for i in range(60):
        request_id = random.getrandbits(63)
        for build in (lambda: wire.Forward(request_id, (wire.Row(0, 0, SamplingSettings()),), tensor),
                      lambda: wire.Forward(request_id, 0, tensor, SamplingSettings())):
            try:
                messages.append([bytes(f) for f in wire.encode(build())])
                break
            except Exception:
                continue
        else:
            messages.append([b"EX" + bytes(16), tensor.numpy().tobytes()])
    return messages


def deep_nesting() -> list[list[bytes]]:
    """A PING with 200,000 '[' after its header, and a 2 KB frame nested 985 deep."""
    return [[b"EX\x02\x05" + bytes(8) + b"[" * 200_000], [b"EX" + b"[" * 985 + b"]" * 985 + b" " * 76]]


def zmq_send(port: int, messages: list[list[bytes]]) -> None:
    """Push every message at a port, as an attacker without the secret can (plain ZeroMQ), and
    with a made-up CurveZMQ key. Bounded: gives up on a message after 50 ms."""
    context = zmq.Context()
    try:
        for curve in (False, True):
            sock = context.socket(zmq.PUSH)
            sock.linger = 0
            sock.sndtimeo = 50
            if curve:
                public, secret = zmq.curve_keypair()
                sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()[0], public, secret
            sock.connect(f"tcp://127.0.0.1:{port}")
            for message in messages:
                try:
                    sock.send_multipart(message)
                except zmq.Again:
                    break
            time.sleep(0.1)
            sock.close()
    finally:
        context.term()


def raw_send(port: int, payloads: list[bytes]) -> None:
    for payload in payloads:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(payload)
        except OSError:
            pass


def test_everything_listens_on_loopback_only(server):
    listening = [(process.pid, address) for process in server.tree() for address in listening_ports(process)]
    assert listening, "the server listens nowhere?"
    assert all(ip == "127.0.0.1" for _, (ip, _) in listening), listening
    ports = data_plane_ports(server)
    assert len(ports["coordinator"]) >= 1 and len(ports["stages"]) >= 2, ports


def test_the_secret_never_shows_in_the_output(server):
    engine = next(p for p in server.tree() if "ipyparallel.engine" in " ".join(p.cmdline()))
    secret = engine.environ().get("EXO_LAB_SECRET")
    assert secret and len(secret) >= 32          # a random per-cluster secret, handed down by the environment
    assert all(secret not in " ".join(p.cmdline()) for p in server.tree())
    assert secret not in "".join(server.lines)


@pytest.mark.parametrize("target", ["coordinator", "stages"])
def test_forged_frames_cannot_reach_a_request(server, references, target):
    ports = data_plane_ports(server)[target]
    dropped_before = metric(server, "exo_lab_dropped_messages_total")
    attack = forged_messages() + deep_nesting()
    stop = threading.Event()

    def attacker() -> None:
        rounds = 0
        while not stop.is_set() and rounds < 5:       # bounded: at most 5 rounds
            for port in ports:
                zmq_send(port, attack)
                raw_send(port, [b"\xff" * 64, b"EX" + b"[" * 2048, os.urandom(4096)])
            rounds += 1

    thread = threading.Thread(target=attacker, daemon=True)
    thread.start()
    try:
        assert_victims_untouched(server, references)
    finally:
        stop.set()
        thread.join(60)
    assert_victims_untouched(server, references)
    if target == "coordinator":   # refusals are counted where the scheduler's inbox sees them
        assert metric(server, "exo_lab_dropped_messages_total") > dropped_before


def test_forward_flood_with_fresh_ids_is_refused(server, references):
    flood = forward_flood()
    for port in data_plane_ports(server)["stages"]:
        zmq_send(port, flood)
    assert_victims_untouched(server, references)
    # nothing of the flood holds memory on a stage: its engine's RSS did not grow by the 180 MiB
    # the issue measured (60 x 2,048 tokens of KV)
    engines = [p for p in server.tree() if "ipyparallel.engine" in " ".join(p.cmdline())
               and "nanny" not in " ".join(p.cmdline())]
    assert all(p.memory_info().rss < 2 << 30 for p in engines)


# ------------------------------------------------------------------ the API
def test_80000_stop_strings_are_refused_at_once(server, references):
    started = time.monotonic()
    status, _, data = request(server, "POST", CHAT, {**VICTIMS[0][1], "stop": ["a"] * 80_000})
    assert status == 400 and b'"stop"' in data
    assert time.monotonic() - started < 2.0
    for stop, expected in ((["a", "b", "c", "d"], 200), (["a"] * 5, 400), (["x" * 257], 400)):
        assert request(server, "POST", CHAT, {**VICTIMS[0][1], "stop": stop})[0] == expected
    assert_victims_untouched(server, references)


def test_a_mebibyte_prompt_is_refused_before_tokenizing(server, references):
    huge = "x" * ((1 << 20) - 300)
    for path, body in ((CHAT, {**VICTIMS[0][1], "messages": [{"role": "user", "content": huge}]}),
                       ("/v1/completions", {**VICTIMS[2][1], "prompt": huge})):
        started = time.monotonic()
        status, _, data = request(server, "POST", path, body)
        assert status == 400 and b"context_length_exceeded" in data, data
        assert time.monotonic() - started < 1.0
    assert_victims_untouched(server, references)


HALF_SENT = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n"


def test_half_sent_requests_up_to_the_connection_cap(server, references):
    from exo_lab.api.guard import ApiLimits

    cap = ApiLimits().max_connections
    fds_before = psutil.Process(server.process.pid).num_fds()
    held = []
    try:
        for i in range(cap + 50):   # from 5 addresses, each within its own share (issue 22)
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5,
                                            source_address=(f"127.0.0.{2 + i % 5}", 0))
            sock.sendall(HALF_SENT)
            held.append(sock)
        time.sleep(0.5)
        # bounded whatever the attacker opens: the cap, plus refused ones closing (at most 64)
        assert psutil.Process(server.process.pid).num_fds() < fds_before + cap + 64 + 10
        # a whole request takes the place of a stalled one (issue 22: it used to get a 503)
        started = time.monotonic()
        status, _, data = request(server, "GET", "/health", timeout_s=10)
        assert status == 200, data
        assert time.monotonic() - started < 2.0
        # the server drops requests whose headers do not arrive in time, without the attacker's help
        deadline = time.monotonic() + 25
        for sock in held:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                assert sock.recv(1 << 16) == b"", "a half-sent request got an answer"
            except TimeoutError:
                raise AssertionError("half-sent requests were never timed out") from None
            except ConnectionResetError:
                pass
    finally:
        for sock in held:
            sock.close()
    assert_victims_untouched(server, references)


@pytest.mark.parametrize("host, status", [("evil.example", 403), ("evil.example:8000", 403),
                                          ("localhost", 200), ("127.0.0.1:{port}", 200),
                                          ("[::1]:{port}", 200)])
def test_host_allow_list_on_a_loopback_bind(server, host, status):
    answer = request(server, "GET", "/v1/models", headers={"Host": host.format(port=server.port)})
    assert answer[0] == status, answer
    if status == 403:
        assert b"host_not_allowed" in answer[2]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", ""])
def test_post_needs_json(server, references, content_type):
    status, _, data = request(server, "POST", CHAT, VICTIMS[0][1], headers={"Content-Type": content_type})
    assert status == 415 and b"unsupported_media_type" in data
    assert request(server, "POST", CHAT, VICTIMS[0][1],
                   headers={"Content-Type": "application/json; charset=utf-8"})[0] == 200


MALFORMED = [
    [{"role": ["user"], "content": "x"}], [{"a": 1}], ["just a string"], [["user", "x"]], [None],
    [{"role": None, "content": "x"}], [{"role": {"r": 1}, "content": "x"}], [{"role": "tool", "content": "x"}],
    [{"role": "user", "content": {"text": "x"}}], [{"role": "user", "content": None}],
    [{"role": "user", "content": ["x"]}], [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
    [{"role": "user", "content": [{"type": "text", "text": 5}]}], [{"role": "user"}],
    [{"role": "user", "content": "x", "name": ["n"]}], [], {"role": "user", "content": "x"}, "hi", 5, None,
]


@pytest.mark.parametrize("messages", MALFORMED, ids=[json.dumps(m)[:40] for m in MALFORMED])
def test_malformed_messages_are_400(server, messages):
    status, _, data = request(server, "POST", CHAT, {**VICTIMS[0][1], "messages": messages})
    assert status == 400, data
    assert set(json.loads(data)["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("raw", [b'"\\ud800"', b'"a\\udfffb"', b'[{"type": "text", "text": "\\ud83d"}]'])
def test_lone_surrogates_are_400(server, references, raw):
    body = b'{"model": "demo", "max_tokens": 4, "messages": [{"role": "user", "content": ' + raw + b"}]}"
    status, _, data = request(server, "POST", CHAT, body)
    assert status == 400, data
    assert_healthy(server)


def test_requests_past_the_queue_get_429_not_memory(server, references, long_answer_body):
    """More long requests at once than KV slots + queue: the surplus is refused with 429 and
    Retry-After at once, nothing else is allocated, and hanging up frees everything."""
    body = json.dumps(long_answer_body).encode()
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    slots, queue = metric(server, "exo_lab_kv_slots") or 8, 64
    sockets = []
    try:
        for i in range(int(slots) + queue + 8):   # from 4 addresses, each within its share of connections
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                            source_address=(f"127.0.0.{2 + i % 4}", 0))
            sock.sendall(head + body)
            sockets.append(sock)
        refused = 0
        for sock in sockets[-16:]:      # the last ones found the queue full
            sock.settimeout(0.5)
            try:
                answer = sock.recv(65536)
            except socket.timeout:
                continue
            if answer.startswith(b"HTTP/1.1 429"):
                assert b"Retry-After:" in answer and b"queue_full" in answer
                refused += 1
        assert refused >= 1
        assert metric(server, "exo_lab_requests_queued") <= queue
    finally:
        for sock in sockets:
            sock.close()
    deadline = time.monotonic() + 10
    while metric(server, "exo_lab_requests_in_flight") > 0:
        assert time.monotonic() < deadline, "requests of clients that left are still generating"
        time.sleep(0.1)
    assert_victims_untouched(server, references)


def test_tiny_temperature_is_greedy(server):
    greedy = answer_of(server, CHAT, VICTIMS[0][1])
    assert answer_of(server, CHAT, {**VICTIMS[0][1], "temperature": 1e-38}) == greedy


def test_error_bodies_name_no_host_or_internals(server):
    status, _, data = request(server, "POST", CHAT, {**VICTIMS[0][1], "max_tokens": 10**6})
    assert status == 400
    for private in (socket.gethostname(), "Traceback", "torch", "tcp://"):
        assert private.encode() not in data


@pytest.fixture(scope="module")
def long_answer_body(server) -> dict:
    """A chat whose greedy answer runs past 128 tokens, so hanging up always interrupts it."""
    for content in ("Tell me a long story.", "Count to a thousand.", "Hello", "Describe the sea.", "Why?"):
        body = {"model": "demo", "messages": [{"role": "user", "content": content}], "temperature": 0,
                "max_tokens": 128}
        if answer_of(server, CHAT, body)[1] == "length":
            return {**body, "max_tokens": 1500}
    pytest.fail("every candidate prompt reaches end of sequence within 128 tokens")


def test_a_client_that_left_always_stops_its_generation(server, references, long_answer_body):
    """80 non-stream requests whose clients hang up at random moments: each generation stops."""
    body = json.dumps(long_answer_body).encode()
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    rng = random.Random(9)
    kept_generating = 0
    for _ in range(80):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(head + body)
        time.sleep(rng.uniform(0.01, 0.08))
        sock.close()
        deadline = time.monotonic() + 2.0
        while metric(server, "exo_lab_requests_in_flight") > 0:
            if time.monotonic() > deadline:
                kept_generating += 1
                break
            time.sleep(0.02)
    assert kept_generating == 0
    assert_victims_untouched(server, references)


# ------------------------------------------------------------------ ending servers
def test_sigterm_ends_open_streams_with_an_error_event_and_done(server, long_answer_body):
    body = json.dumps({**long_answer_body, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall((f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
    received = b""
    while received.count(b"data: ") < 3:
        received += sock.recv(65536)
    server.process.send_signal(signal.SIGTERM)
    while chunk := sock.recv(65536):
        received += chunk
    sock.close()
    events = [line for line in received.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: "):])["error"]["message"]
    assert server.process.wait(60) == 0


COORDINATOR = """
import exo_lab, sys, time
cluster = exo_lab.Cluster.local(engines=1, max_cores=1, profile_dir=sys.argv[1]).start()
print("started", flush=True)
time.sleep(600)
"""


def test_sigkill_of_the_coordinator_leaves_no_process_behind(tmp_path):
    env = {**os.environ, "EXO_LAB_HOME": str(tmp_path / "home")}
    coordinator = subprocess.Popen([sys.executable, "-c", COORDINATOR, str(tmp_path / "profile")], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert coordinator.stdout.readline().strip() == "started"
        tree = psutil.Process(coordinator.pid).children(recursive=True)
        assert len(tree) >= 3, tree        # the controller (+ its schedulers), an engine and its nanny
    finally:
        coordinator.kill()                 # SIGKILL: nothing of the coordinator's own cleanup runs
        coordinator.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in tree):
        time.sleep(0.2)
    left = [(p.pid, " ".join(p.cmdline())) for p in tree if alive(p)]
    for process in tree:    # whatever the verdict, leave nothing running
        if alive(process):
            process.kill()
    assert not left, f"processes left after SIGKILL of the coordinator: {left}"
