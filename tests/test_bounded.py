"""Every listening socket bounded (issue 22): connection floods against every port class of a real
coordinator under a 1,024-descriptor limit, and the pieces that bound them, one by one.

The server: `python -m exo_lab.server` (demo model, 2 local engines = 2 stages, a cluster
secret, a port range) starts under ``RLIMIT_NOFILE`` = 1,024 soft and hard (as ``prlimit
--nofile=1024``), so it cannot raise it. Then, one port class at a time (API, join/files, the
coordinator's data-plane inbox, a stage's), another process holds 1,100 connections from 8
addresses, reopening any the server closes: idle ones, and half-sent ones (HTTP headers and a
few bytes of a 10 KB body; for ZeroMQ, 11 of a greeting's 64 bytes). Meanwhile the test sends
good requests: GET /health, a short completion with the openai client, a real join with the
secret. Each flood must leave every good request answered, their p99 within 5x (+1 s) of the p99
before (the issue's target is 2x; timed bounds are generous on a shared 2-core machine that also
runs the attacker; the figures are printed), the server's output growing by under 1 MB in all
with no traceback, and its descriptors below the limit. Run with ``-s`` to see the figures.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
from ports import free_port, free_port_range
from procs import stop as stop_process

from exo_lab.httpguard import EVICTABLE_AFTER_S

FLOOD_CONNECTIONS = 1100
DESCRIPTOR_LIMIT = 1024
ATTACKERS = [f"127.0.0.{i}" for i in range(2, 10)]   # the good client is 127.0.0.1
WINDOW_S = 2.5                 # good requests are timed for this long, before and during a flood
LOG_GROWTH_BYTES = 1 << 20

CONFIG = """\
cluster_name: bounded_test
devices:
  - hostname: localhost
    roles: [coordinator, compute]
    address: 127.0.0.1
    engines: 2
    max_memory: 2GB
    max_cores: 1
network:
  discovery: manual
  port_range: {first}-{last}
  secret_file: secret.txt
api:
  port: {api_port}
"""
HALF_SENT = {  # what a half-sent request looks like on each kind of port
    "http": b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000\r\n\r\n{\"model\": ",
    "zmq": b"\xff" + bytes(8) + b"\x7f" + b"\x03",     # 11 of ZMTP 3's 64 greeting bytes
}


# ------------------------------------------------------------------ the attacker (its own process)
def flood(port: int, payload: bytes, connections: int, seconds: float) -> None:
    """Hold ``connections`` connections to 127.0.0.1:``port`` for ``seconds``, each sending
    ``payload`` once connected (b"": idle); reopen any the server closes. Connects without
    waiting (non-blocking), from ATTACKERS addresses in turn (more than the API lets one client
    hold). Prints "ready" once that many connected (a server that closes some never lets all of
    them be open at once)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (connections + 200, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    held: dict[int, socket.socket] = {}
    poller = select.poll()
    connected = closed = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        while len(held) < connections:
            sock = socket.socket()
            sock.setblocking(False)
            sock.bind((ATTACKERS[(connected + len(held)) % len(ATTACKERS)], 0))
            sock.connect_ex(("127.0.0.1", port))
            held[sock.fileno()] = sock
            poller.register(sock, select.POLLOUT)
        for fd, events in poller.poll(20):
            sock = held[fd]
            if events & select.POLLOUT and not events & (select.POLLERR | select.POLLHUP):
                connected += 1
                if payload:
                    sock.send(payload)
                poller.modify(fd, select.POLLIN)
                if connected == connections:
                    print("ready", flush=True)
                continue
            poller.unregister(fd)        # the server closed it (or refused, or answered)
            held.pop(fd).close()
            closed += 1
    print(f"connected {connected} closed-by-server {closed}", flush=True)


# ------------------------------------------------------------------ the pieces, in this process
class Blocked:
    """A tornado app whose GET /block waits until ``release`` is set (a request being answered)."""

    def __init__(self):
        import asyncio

        import tornado.web

        self.release = asyncio.Event()
        release = self.release

        class Block(tornado.web.RequestHandler):
            async def get(self):
                await release.wait()
                self.write("done")

        class Fast(tornado.web.RequestHandler):
            def get(self):
                self.write("fast")

        self.app = tornado.web.Application([(r"/block", Block), (r"/fast", Fast)])


@contextlib.contextmanager
def guarded(max_connections: int, per_client=None):
    """A GuardedHTTPServer on a loopback port, on a loop thread of its own: (server, port,
    Blocked, release: a function that lets every /block request finish)."""
    import asyncio

    from exo_lab.httpguard import GuardedHTTPServer, HttpLimits, bind_sockets

    started: dict = {}
    ready = threading.Event()

    async def main():
        started["blocked"] = Blocked()
        started["stop"] = asyncio.Event()
        sockets = bind_sockets(0, "127.0.0.1")
        started["server"] = GuardedHTTPServer(started["blocked"].app, limits=HttpLimits(max_connections=max_connections),
                                              per_client=per_client, name="the test server")
        started["server"].add_sockets(sockets)
        started["port"], started["loop"] = sockets[0].getsockname()[1], asyncio.get_running_loop()
        ready.set()
        await started["stop"].wait()
        started["blocked"].release.set()
        started["server"].stop()
        await started["server"].close_all_connections()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        release = functools.partial(started["loop"].call_soon_threadsafe, started["blocked"].release.set)
        yield started["server"], started["port"], release
    finally:
        started["loop"].call_soon_threadsafe(started["stop"].set)
        thread.join(10)


def get(port: int, path: str, source: str = "127.0.0.1", timeout_s: float = 10) -> tuple[int, bytes]:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s, source_address=(source, 0))
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def send_then_hold(port: int, payload: bytes, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    if payload:
        sock.sendall(payload)
    return sock


def closed_by_server(sockets: list[socket.socket], within_s: float) -> int:
    """How many of ``sockets`` the server closed (or answered) within ``within_s``."""
    closed: set = set()
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and len(closed) < len(sockets):
        readable, _, _ = select.select([s for s in sockets if s not in closed], [], [], 0.05)
        closed.update(readable)
    return len(closed)


def test_idle_and_half_sent_connections_give_way_to_a_whole_request():
    with guarded(max_connections=8) as (server, port, _):
        held = [send_then_hold(port, payload, f"127.0.0.{2 + i % 4}")
                for i, payload in enumerate([b"", HALF_SENT["http"]] * 10)]
        try:
            # stalled connections are old by nature; one younger than this may be a real client
            # whose request is still on its way, and is never closed for another
            time.sleep(EVICTABLE_AFTER_S + 0.05)
            started = time.monotonic()
            assert get(port, "/fast") == (200, b"fast")          # it took the place of a stalled one
            assert time.monotonic() - started < 1.0
            # at most the cap and the lobby were ever held; those past it were closed after a peek
            assert closed_by_server(held, 1.0) >= len(held) - 8
            assert server.evicted_connections >= 1 and server.refused_connections >= len(held) - 8 - 2
        finally:
            for sock in held:
                sock.close()


def test_a_server_answering_every_connection_refuses_with_503_and_one_client_past_its_share_with_429():
    from exo_lab.api.tenants import ConnectionCounter

    with guarded(max_connections=8, per_client=ConnectionCounter(3)) as (server, port, release):
        pool = concurrent.futures.ThreadPoolExecutor(16)
        busy = [pool.submit(get, port, "/block", f"127.0.0.{2 + i // 3}") for i in range(9)]   # the cap + an eighth
        try:
            assert wait_for(lambda: len(server._connections) == 9, 10)
            status, body = get(port, "/fast", "127.0.0.10")
            assert status == 503 and b"maximum of 8 open connections" in body
            status, body = get(port, "/fast", "127.0.0.2")          # holds 3 of its 3
            assert status == 429 and b"your client holds 3 of its 3 open connections" in body
        finally:
            release()
            assert [future.result(10) for future in busy] == [(200, b"done")] * 9
            pool.shutdown()
        assert get(port, "/fast", "127.0.0.2") == (200, b"fast")     # its connections were counted back


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_out_of_descriptors_the_server_pauses_instead_of_spinning_or_logging_each_time(tmp_path):
    """A guarded server under a 64-descriptor limit, 200 idle connections: accept fails with
    EMFILE, the server waits and tries again (not 100% CPU, not a traceback per wake-up), and
    answers again once they are gone."""
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(["prlimit", "--nofile=64", sys.executable, __file__, "serve"],
                                   stdout=subprocess.PIPE, stderr=out)
    held = []
    try:
        port = int(process.stdout.readline())
        held = [send_then_hold(port, b"") for _ in range(200)]
        cpu_before = sum(psutil.Process(process.pid).cpu_times()[:2])
        time.sleep(1.5)
        cpu_s = sum(psutil.Process(process.pid).cpu_times()[:2]) - cpu_before
        for sock in held:
            sock.close()
        assert wait_for(lambda: get(port, "/fast", timeout_s=5) == (200, b"fast"), 15)
        text = log.read_text()
        print(f"\nout of descriptors: {cpu_s:.2f} s CPU in 1.5 s; log: {text!r}")
        assert cpu_s < 0.75 and "cannot accept connections (Too many open files)" in text
        assert len(text.splitlines()) <= 10 and "Traceback" not in text
    finally:
        for sock in held:
            sock.close()
        process.kill()
        process.wait()


def serve_limited() -> None:
    """`python test_bounded.py serve`: a guarded server on a free port (printed), logging as
    `python -m exo_lab.server` does."""
    import asyncio
    import logging

    from exo_lab.httpguard import GuardedHTTPServer, HttpLimits, bind_sockets
    from exo_lab.limits import bound_logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    bound_logging()

    async def main():
        sockets = bind_sockets(0, "127.0.0.1")
        GuardedHTTPServer(Blocked().app, limits=HttpLimits()).add_sockets(sockets)
        print(sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def test_the_log_keeps_a_few_of_each_kind_and_counts_the_rest():
    import logging

    from exo_lab.limits import LogOnce, RepeatFilter

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    repeats = RepeatFilter()
    handler.addFilter(repeats)
    log = logging.getLogger("exo_lab.test_bounded")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("a huge argument: %s", "x" * 1_000_000)
        assert len(records) == 1 and len(records[0].getMessage()) < 2100
        records.clear()
        for _ in range(100_000):
            log.warning("refused a connection from %s", "10.0.0.7")
        assert len(records) == repeats.burst
        for i in range(10_000):                      # a message made before logging: a kind each
            log.error(f"unexpected thing number {i}", exc_info=ValueError("x"))
        assert len(records) <= repeats.burst + 50 + 5        # the budget over all kinds
        records.clear()
        once = LogOnce(log)
        for _ in range(10_000):
            once.warning("%s refused new connections", "the API")
        assert len(records) <= 1 + 5
    finally:
        log.removeHandler(handler)
        log.propagate = True


@pytest.mark.parametrize("soft, hard, expected", [(256, 4096, 4096), (1024, 1024, 1024)])
def test_the_descriptor_limit_is_raised_where_the_os_allows(soft, hard, expected):
    code = "from exo_lab.limits import raise_descriptor_limit; print(raise_descriptor_limit())"
    done = subprocess.run(["prlimit", f"--nofile={soft}:{hard}", sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.stdout.strip() == f"({expected}, {hard})" and done.stderr == "", done


def test_a_data_plane_inbox_holds_at_most_its_cap_and_its_peer_still_gets_through():
    import zmq

    from exo_lab.security import derive_key, new_secret
    from exo_lab.wire import FrameError, Inbox, Outbox, Ping, auth

    key = derive_key(new_secret(), "data-plane")
    context = zmq.Context()
    try:
        with Inbox(context, key=key) as inbox, Outbox(context, inbox.address, key=key) as outbox:
            outbox.send(Ping(1))
            assert inbox.recv(5000) == Ping(1)
            attacker = subprocess.Popen([sys.executable, __file__, str(inbox.port), "", "400", "1"],
                                        stdout=subprocess.PIPE, text=True)
            try:
                assert attacker.stdout.readline().strip() == "ready"
                monitor = inbox._handshakes
                assert wait_for(lambda: monitor.shut_down > 0, 5)
                # the held ones fail their handshake when the attacker leaves (1 s) or at the
                # handshake interval (2 s): recv reports them once that has happened, not before
                assert wait_for(lambda: monitor.failed > 0, 10)
                outbox.send(Ping(2))
                with pytest.raises(FrameError, match="refused"):    # counted, as forged frames are
                    inbox.recv(5000)
                assert inbox.recv(5000) == Ping(2)
                assert len(monitor._open) <= auth.MAX_INBOX_CONNECTIONS
            finally:
                attacker.kill()
                attacker.wait(30)
    finally:
        context.term()


# ------------------------------------------------------------------ the server
class Server:
    """`python -m exo_lab.server` under the descriptor limit; its output goes to a file."""

    def __init__(self, tmp_path):
        from exo_lab.security import new_secret, write_secret_file

        self.first_port, self.api_port = free_port_range(), free_port()
        self.config = tmp_path / "config.yaml"
        self.config.write_text(CONFIG.format(first=self.first_port, last=self.first_port + 99, api_port=self.api_port))
        self.secret = new_secret()
        write_secret_file(tmp_path / "secret.txt", self.secret)
        self.log = tmp_path / "server.log"
        env = {**os.environ, "EXO_LAB_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
        env.pop("EXO_LAB_SECRET", None)
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                ["prlimit", f"--nofile={DESCRIPTOR_LIMIT}", sys.executable, "-m", "exo_lab.server", "--config",
                 str(self.config), "--model", "demo", "--min-stages", "2"],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        deadline = time.monotonic() + 120
        while b"serving" not in self.log.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("the server did not start:\n" + self.log.read_text())
            time.sleep(0.2)
        limit = psutil.Process(self.process.pid).rlimit(psutil.RLIMIT_NOFILE)
        assert limit == (DESCRIPTOR_LIMIT, DESCRIPTOR_LIMIT), limit

    @property
    def service_port(self) -> int:
        return self.first_port         # network.service_port: the range's first port by default

    @functools.cached_property
    def ports(self) -> dict[str, int]:
        """One port of each class: the API, join/files, the coordinator's inbox, a stage's inbox."""
        coordinator = psutil.Process(self.process.pid)
        own = {c.laddr.port for c in coordinator.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        inbox = min(own - {self.api_port, self.service_port})
        engine = next(p for p in coordinator.children(recursive=True)
                      if "ipyparallel.engine" in " ".join(p.cmdline()) and "nanny" not in " ".join(p.cmdline()))
        stage = min(c.laddr.port for c in engine.net_connections("tcp") if c.status == psutil.CONN_LISTEN
                    and self.first_port <= c.laddr.port < self.first_port + 100)
        self.stage_pid = engine.pid
        return {"api": self.api_port, "service": self.service_port, "inbox": inbox, "stage-inbox": stage}

    def stop(self) -> None:
        stop_process(self.process)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = Server(tmp_path_factory.mktemp("bounded"))
    try:
        yield started
    finally:
        started.stop()


# ------------------------------------------------------------------ good requests
class Client:
    """The good requests, each timed: /health, a 2-token completion, a join with the secret."""

    def __init__(self, server: Server):
        from openai import OpenAI

        self.server = server
        self.openai = OpenAI(base_url=f"http://127.0.0.1:{server.api_port}/v1", api_key="unused",
                             max_retries=0, timeout=15)

    def health(self) -> None:
        import http.client

        connection = http.client.HTTPConnection("127.0.0.1", self.server.api_port, timeout=15)
        try:
            connection.request("GET", "/health")
            answer = connection.getresponse()
            assert answer.status == 200, answer.read()
        finally:
            connection.close()

    def complete(self) -> None:
        reply = self.openai.completions.create(model="demo", prompt="Hello", max_tokens=2, temperature=0)
        assert reply.usage.completion_tokens >= 1

    def join(self) -> None:
        from exo_lab.membership.discovery import join

        join("127.0.0.1", self.server.service_port, "bounded_test", "probe.test", self.server.secret, timeout_s=15)

    def timed(self, seconds: float) -> dict[str, list[float]]:
        """Run the good requests in turn for ``seconds``; latencies per kind (failures raise)."""
        latencies: dict[str, list[float]] = {"health": [], "complete": [], "join": []}
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for kind, latency in latencies.items():
                started = time.monotonic()
                getattr(self, kind)()
                latency.append(time.monotonic() - started)
        return latencies


def p99(latencies: dict[str, list[float]]) -> float:
    values = sorted(value for kind in latencies.values() for value in kind)
    return values[min(len(values) - 1, int(len(values) * 0.99))]


@pytest.fixture(scope="module")
def before(server):
    client = Client(server)
    client.timed(0.5)          # warm: first requests load the tokenizer, connect the pipes
    return client.timed(WINDOW_S)


class Peak:
    """The highest descriptor count of some processes, sampled on a thread."""

    def __init__(self, pids: list[int]):
        self.processes = [psutil.Process(pid) for pid in pids]
        self.fds = {pid: 0 for pid in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            for process in self.processes:
                self.fds[process.pid] = max(self.fds[process.pid], process.num_fds())

    def stop(self) -> dict[int, int]:
        self._stop.set()
        self._thread.join()
        return self.fds


FIGURES: list[str] = []
GROWTH: list[int] = []


def run_flood(server: Server, port: int, payload: bytes) -> tuple[dict, int, int, float]:
    """Flood ``port`` while timing the good requests; (latencies, log growth, peak descriptors,
    the server process's CPU use in cores)."""
    log_before = server.log.stat().st_size
    cpu_before, wall_before = sum(psutil.Process(server.process.pid).cpu_times()[:2]), time.monotonic()
    peak = Peak([server.process.pid] + ([server.stage_pid] if port == server.ports["stage-inbox"] else []))
    attacker = subprocess.Popen([sys.executable, __file__, str(port), payload.hex(), str(FLOOD_CONNECTIONS),
                                 str(WINDOW_S + 6)], stdout=subprocess.PIPE, text=True)
    try:
        ready = attacker.stdout.readline()
        assert ready.strip() == "ready", f"the attacker never made {FLOOD_CONNECTIONS} connections: {ready!r}"
        latencies = Client(server).timed(WINDOW_S)
    finally:
        attacker.send_signal(signal.SIGTERM)
        attacker.wait(30)
        fds = peak.stop()
    time.sleep(0.5)       # what the server logs as the connections go
    cpu = (sum(psutil.Process(server.process.pid).cpu_times()[:2]) - cpu_before) / (time.monotonic() - wall_before)
    return latencies, server.log.stat().st_size - log_before, max(fds.values()), cpu


@pytest.mark.parametrize("target, kind", [
    ("api", "idle"), ("api", "half"), ("service", "idle"), ("service", "half"),
    ("inbox", "idle"), ("inbox", "half"), ("stage-inbox", "idle")])
def test_a_flood_leaves_good_requests_answered(server, before, target, kind):
    port = server.ports[target]
    payload = b"" if kind == "idle" else HALF_SENT["zmq" if "inbox" in target else "http"]
    during, growth, fds, cpu = run_flood(server, port, payload)
    GROWTH.append(growth)
    figure = (f"{target:<12} {kind:<5} port {port}: p99 {p99(before) * 1000:.0f} ms before, "
              f"{p99(during) * 1000:.0f} ms during ({sum(map(len, during.values()))} good requests, "
              f"join p99 {max(during['join']) * 1000:.0f} ms); log +{growth} B; peak fds {fds}/{DESCRIPTOR_LIMIT}; "
              f"CPU {cpu:.0%}")
    FIGURES.append(figure)
    print("\n" + figure)
    assert p99(during) <= 5 * p99(before) + 1.0, figure
    assert fds < DESCRIPTOR_LIMIT - 16, figure
    assert server.process.poll() is None


def test_the_log_stayed_small_and_quiet(server):
    text = server.log.read_text(errors="replace")
    print("\n" + "\n".join(FIGURES) + f"\nlog growth in all: {sum(GROWTH)} B; server log:\n{text[-3000:]}")
    assert GROWTH and sum(GROWTH) < LOG_GROWTH_BYTES
    assert "Traceback" not in text and "Too many open files" not in text


if __name__ == "__main__":      # python test_bounded.py PORT PAYLOAD_HEX CONNECTIONS SECONDS | serve
    if sys.argv[1] == "serve":
        serve_limited()
    else:
        flood(int(sys.argv[1]), bytes.fromhex(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
