"""Issue 22's cheap attacks on the API, replayed against a real server (demo model over two
engines): every request's work is bounded before tokenizing, no input reaches a 500 or writes a
traceback, and /health stays cheap (it does not go through the stages per call).

Each test prints its figures (run with -s to see them); the bounds asserted are loose, since the
suite shares two cores with other work.
"""
from __future__ import annotations

import asyncio
import json
import logging
import statistics
import subprocess
import sys
import threading
import time

import pytest

from exo_lab.api.handlers import HEALTH_TTL_S
from exo_lab.api.params import MAX_CONTENT_PARTS, MAX_JSON_DEPTH, MAX_MESSAGES
from exo_lab.api.tokenizing import FairTokenizer
from fixtures_api import API_KEY, assert_serving, call, chat_body, server  # noqa: F401 (fixtures)

CHAT = "/v1/chat/completions"
EMPTY_MESSAGES = {"model": "demo", "messages": [{"role": "user", "content": ""}] * 30_000, "max_tokens": 1}


class Records(logging.Handler):
    """Every log record of the module's server, for the no-traceback checks."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def tracebacks(self) -> list[str]:
        return [f"{r.name}: {r.getMessage()}" for r in self.records if r.exc_info or "Traceback" in r.getMessage()]


@pytest.fixture(scope="module")
def log(server):
    records = Records()
    root = logging.getLogger()
    level = root.level
    root.addHandler(records)
    root.setLevel(logging.INFO)
    yield records
    root.removeHandler(records)
    root.setLevel(level)


def good_chat_ms(server) -> float:
    started = time.perf_counter()
    answer = call(server, "POST", CHAT, chat_body("Hello", max_tokens=1))
    assert answer.status == 200, answer.body
    return (time.perf_counter() - started) * 1000


FLOOD = """
import http.client, json, sys, time
port, key, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
raw = json.dumps({"model": "demo", "messages": [{"role": "user", "content": ""}] * 30_000, "max_tokens": 1}).encode()
for _ in range(count):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    started = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body=raw,
                       headers={"Content-Type": "application/json", "Authorization": "Bearer " + key})
    answer = connection.getresponse()
    code = json.loads(answer.read())["error"]["code"]
    print(answer.status, code, round((time.perf_counter() - started) * 1000), flush=True)
"""


# ---------------------------------------------------------------- bounded work per request
def test_thirty_thousand_empty_messages_are_refused_before_tokenizing(server, log):
    """Two clients (processes) send 30,000 empty messages (966 KB) again and again; before the
    caps each took 0.5-0.9 s of the one tokenizer thread and a good chat went from ~30 ms to ~1 s."""
    idle = [good_chat_ms(server) for _ in range(5)]
    floods = [subprocess.Popen([sys.executable, "-c", FLOOD, str(server.port), API_KEY, "15"], stdout=subprocess.PIPE,
                               text=True) for _ in range(2)]
    time.sleep(0.5)       # the clients start and build their bodies
    during = []
    while any(flood.poll() is None for flood in floods):
        during.append(good_chat_ms(server))
    refusals = [line.split() for flood in floods for line in flood.stdout.read().splitlines()]
    print(f"\n30,000 empty messages: refused in {sorted(int(ms) for _, _, ms in refusals)} ms; a good chat: "
          f"{statistics.median(idle):.0f} ms idle, {statistics.median(during):.0f} ms median "
          f"({max(during):.0f} max, {len(during)} chats) during two such floods")
    assert len(refusals) == 30 and all(status == "400" and code == "too_many_messages"
                                       for status, code, _ in refusals), refusals
    assert max(int(ms) for _, _, ms in refusals) < 1000
    assert statistics.median(during) < 500
    assert not log.tracebacks()


def test_the_key_is_checked_before_the_body_is_parsed(server):
    started = time.perf_counter()
    answer = call(server, "POST", CHAT, json.dumps(EMPTY_MESSAGES).encode(), key=None)
    assert answer.status == 401 and time.perf_counter() - started < 1.0


@pytest.mark.parametrize("count, code", [(MAX_MESSAGES + 1, "too_many_messages"),
                                         (MAX_MESSAGES, "context_length_exceeded")])
def test_message_count_is_bounded_with_the_fix(server, count, code):
    body = chat_body()
    body["messages"] = [{"role": "user", "content": "hi"}] * count
    error = call(server, "POST", CHAT, body).error
    assert error["code"] == code and error["param"] == "messages", error
    assert str(count) in error["message"]


def test_content_parts_are_bounded(server):
    body = chat_body()
    body["messages"] = [{"role": "user", "content": [{"type": "text", "text": ""}] * (MAX_CONTENT_PARTS + 1)}]
    answer = call(server, "POST", CHAT, body)
    assert answer.status == 400 and answer.error["code"] == "too_many_content_parts", answer.body
    assert "one string" in answer.error["message"]


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 982, 983, 984, 5_000, 400_000])
@pytest.mark.parametrize("key", [API_KEY, None], ids=["key", "no-key"])
def test_deep_json_is_a_400_never_a_500(server, log, depth, key):
    raw = b'{"model": "demo", "messages": ' + b"[" * depth + b"]" * depth + b"}"
    answer = call(server, "POST", CHAT, raw, key=key)
    assert answer.status == (400 if key else 401), answer.body
    if key:
        assert answer.error["code"] == "invalid_json" and f"at most {MAX_JSON_DEPTH}" in answer.error["message"]
    assert not log.tracebacks()


def test_brackets_in_strings_do_not_count_and_the_limit_itself_is_parsed(server):
    assert call(server, "POST", CHAT, chat_body(user='[[[{{{\\"' * 100)).status == 200
    nested = {}
    for _ in range(MAX_JSON_DEPTH - 2):      # inside the body's own object: MAX_JSON_DEPTH deep
        nested = {"a": nested}
    error = call(server, "POST", CHAT, chat_body(metadata=nested)).error
    assert error["param"] == "metadata", error   # parsed, then refused for what it holds


@pytest.mark.parametrize("path, status", [
    ("/static/a%00", 404), ("/static/%00", 404), ("/static/chat.js%00", 404), ("/static/..%2fpages.py", 404),
    ("/static/%2e%2e/pages.py", 404), ("/static/.hidden", 404), ("/static/a%ff", 400), ("/static/" + "a" * 5000, 404),
    ("/static/chat.js", 200)])
def test_static_files_odd_names_are_refused_without_a_traceback(server, log, path, status):
    assert call(server, "GET", path, key=None).status == status
    assert not log.tracebacks()
    assert_serving(server)


# ---------------------------------------------------------------- /health
def test_a_health_flood_does_not_reach_the_stages(server, cluster, monkeypatch):
    scheduler = cluster.pipeline.scheduler
    pings = []
    real_ping = scheduler.ping

    async def counted_ping(*args, **kwargs):
        pings.append(time.monotonic())
        return await real_ping(*args, **kwargs)

    monkeypatch.setattr(scheduler, "ping", counted_ping)
    answers: list[tuple[int, dict, float]] = []

    def probe(count: int) -> None:
        for _ in range(count):
            started = time.perf_counter()
            answer = call(server, "GET", "/health", key=None)
            answers.append((answer.status, answer.json, time.perf_counter() - started))

    started = time.monotonic()
    probes = [threading.Thread(target=probe, args=(50,)) for _ in range(4)]
    for thread in probes:
        thread.start()
    for thread in probes:
        thread.join()
    elapsed = time.monotonic() - started
    ms = sorted(seconds * 1000 for _, _, seconds in answers)
    print(f"\n{len(answers)} /health in {elapsed:.2f} s (p50 {ms[len(ms) // 2]:.1f} ms, max {ms[-1]:.1f} ms): "
          f"{len(pings)} ping(s) through the stages")
    assert all(status == 200 and body == {"status": "ok", "state": "serving", "model": "demo"} for status, body, _ in answers)
    assert len(pings) <= 1 + elapsed / HEALTH_TTL_S


def test_health_still_notices_a_lost_pipeline_at_once(server, cluster, monkeypatch):
    assert call(server, "GET", "/health", key=None).status == 200
    monkeypatch.setattr(cluster, "recovering", "engine 1 (stage 1) stopped")
    answer = call(server, "GET", "/health", key=None)
    assert answer.status == 503 and answer.json == {"status": "unavailable", "state": "serving",
                                                      "reason": "recovering: engine 1 (stage 1) stopped"}


# ---------------------------------------------------------------- the tokenizer thread
def test_the_tokenizer_takes_clients_in_turn():
    """A client with many queued calls does not hold the thread: another's call runs next."""
    tokenizer = FairTokenizer(name="test-tokenizer")
    order: list[str] = []

    def work(label: str) -> str:
        time.sleep(0.02)
        order.append(label)
        return label

    async def main() -> None:
        flood = [asyncio.ensure_future(tokenizer.run("flooder", work, f"flood-{i}")) for i in range(10)]
        await asyncio.sleep(0.005)
        assert await tokenizer.run("good", work, "good") == "good"
        flood[9].cancel()                        # its caller hung up: the call is skipped
        await asyncio.gather(*flood, return_exceptions=True)

    asyncio.run(main())
    assert order.index("good") <= 2, order
    assert "flood-9" not in order and len(order) == 10
