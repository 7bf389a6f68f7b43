"""Fixtures and helpers for the API tests (imported by tests/test_api*.py, not a conftest).

One real cluster per test module: ``Cluster.local(engines=2)`` with the demo model over two
stages (starting and loading cost 10-20 s, so each module pays it once).
"""
from __future__ import annotations

import http.client
import json
import time

import pytest

API_KEY = "sk-exo-lab-test-0123456789"


@pytest.fixture(scope="module")
def server(cluster):
    """The API on an OS-picked port of 127.0.0.1, requiring ``API_KEY``."""
    served = cluster.serve(host="127.0.0.1", port=0, api_key=API_KEY)
    yield served
    served.stop()


@pytest.fixture(scope="module")
def client(server):
    """The official openai client for ``server``."""
    with openai_client(server) as made:
        yield made


def openai_client(server):
    """The official openai client for ``server`` (no retries: a failure must show at once)."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


class Response:
    """A raw HTTP answer: status, headers, body bytes, and the body as JSON when it is JSON."""

    def __init__(self, status: int, headers: dict, body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self):
        return json.loads(self.body)

    @property
    def error(self) -> dict:
        """The OpenAI error object, checked for its four fields."""
        error = self.json["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        return error


def call(server, method: str, path: str, body=None, *, key: str | None = API_KEY,
         headers: dict | None = None, timeout_s: float = 60) -> Response:
    """One raw HTTP request; ``body`` may be bytes (sent as is) or anything JSON-able."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout_s)
    try:
        sent_headers = {"Content-Type": "application/json", **(headers or {})}
        if key is not None:
            sent_headers["Authorization"] = f"Bearer {key}"
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        connection.request(method, path, body=body, headers=sent_headers)
        answer = connection.getresponse()
        return Response(answer.status, dict(answer.getheaders()), answer.read())
    finally:
        connection.close()


def chat_body(content: str = "Hello", **extra) -> dict:
    return {"model": "demo", "messages": [{"role": "user", "content": content}], "max_tokens": 4,
            "temperature": 0, **extra}


def assert_serving(server) -> None:
    """The server still answers a real generation request (run after every refusal)."""
    answer = call(server, "POST", "/v1/chat/completions", chat_body("still there?"))
    assert answer.status == 200, answer.body
    assert answer.json["usage"]["completion_tokens"] >= 1


def wait_until(condition, timeout_s: float, interval_s: float = 0.02):
    """Poll ``condition()`` until it is truthy; returns (value, seconds waited)."""
    started = time.monotonic()
    while True:
        value = condition()
        waited = time.monotonic() - started
        if value or waited > timeout_s:
            return value, waited
        time.sleep(interval_s)
