"""Every refusal the API makes, over raw HTTP: status, OpenAI error body, and the server serving on.

Each case is followed by a real generation request on the same server (``assert_serving``).
"""
from __future__ import annotations

import socket

import pytest

from exo_lab.api import MAX_BODY_BYTES
from exo_lab.api.errors import ApiError, api_error_from
from exo_lab.errors import ClusterError, RequestError
from fixtures_api import API_KEY, assert_serving, call, chat_body, server  # noqa: F401 (fixtures)

CHAT = "/v1/chat/completions"


def refused(server, method, path, body=None, *, status, param=None, code=None, key=API_KEY, **kwargs):
    """Send, check the status and the error body, check the server still serves; returns the error."""
    answer = call(server, method, path, body, key=key, **kwargs)
    assert answer.status == status, answer.body
    assert answer.headers["Content-Type"].startswith("application/json")
    error = answer.error
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert_serving(server)
    return error


# ---------------------------------------------------------------- 400: malformed bodies and types
@pytest.mark.parametrize("raw", [b'{"model": "demo", "messages": [', b"not json at all", b"\xff\xfe{}",
                                 b'{"model": "demo", "temperature": NaN}', b"",
                                 b"[" * 200_000 + b"]" * 200_000,
                                 b'{"model": "demo", "messages": ' + b"[" * 983 + b"]" * 983 + b"}"],
                         ids=["truncated", "not-json", "not-utf8", "nan", "empty", "deep-nesting", "983-deep"])
def test_malformed_json_is_400(server, raw):
    refused(server, "POST", CHAT, raw, status=400, code="invalid_json")


def test_body_that_is_not_an_object_is_400(server):
    refused(server, "POST", CHAT, [chat_body()], status=400, code="invalid_json")


@pytest.mark.parametrize("field, value", [
    ("max_tokens", "ten"), ("max_tokens", 2.5), ("max_tokens", True), ("max_completion_tokens", "3"),
    ("temperature", "hot"), ("temperature", False), ("top_p", [1]), ("seed", 1.5), ("top_k", "5"),
    ("stream", "yes"), ("stop", 7), ("stop", ["ok", 3]), ("user", 42), ("stream_options", "usage"),
    ("speculative", "no"), ("speculative", 0),
])
def test_wrong_types_are_400_naming_the_field(server, field, value):
    body = chat_body(**{field: value})
    if field == "stream_options":
        body["stream"] = True
    error = refused(server, "POST", CHAT, body, status=400, param=field)
    assert field in error["message"]


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("temperature", 2.5), ("temperature", -0.1), ("top_p", 0), ("top_k", -1),
    ("seed", 2**64), ("stop", ""), ("speculative", "draft_model"),    # this load has no draft model
])
def test_out_of_range_values_are_400(server, field, value):
    refused(server, "POST", CHAT, chat_body(**{field: value}), status=400, param=field)


def test_speculative_may_name_a_drafter_the_load_can_run(server):
    answer = call(server, "POST", CHAT, chat_body(speculative="prompt_lookup", max_tokens=3))
    assert answer.status == 200 and answer.json["usage"]["completion_tokens"] == 3


def test_max_tokens_and_max_completion_tokens_must_agree(server):
    refused(server, "POST", CHAT, chat_body(max_tokens=3, max_completion_tokens=5), status=400,
            param="max_completion_tokens")
    answer = call(server, "POST", CHAT, chat_body(max_tokens=None, max_completion_tokens=3))
    assert answer.status == 200 and answer.json["usage"]["completion_tokens"] == 3


def test_stream_options_need_stream(server):
    refused(server, "POST", CHAT, chat_body(stream_options={"include_usage": True}), status=400,
            param="stream_options")


# ---------------------------------------------------------------- 400: fields not supported
@pytest.mark.parametrize("field, value", [("store", True), ("reasoning_effort", "high"), ("modalities", ["audio"]),
                                          ("functions", [{"name": "f"}])])
def test_unsupported_fields_are_refused_by_name(server, field, value):
    error = refused(server, "POST", CHAT, chat_body(**{field: value}), status=400, param=field,
                    code="unsupported_parameter")
    assert f"'{field}'" in error["message"]


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


# ---------------------------------------------------------------- 400: decoding fields out of bounds
@pytest.mark.parametrize("extra, param", [
    ({"n": 0}, "n"), ({"n": 1000}, "n"), ({"n": True}, "n"), ({"n": "2"}, "n"),
    ({"logprobs": "yes"}, "logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": "x"}, "frequency_penalty"),
    ({"presence_penalty": True}, "presence_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"5": 200}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"), ({"logit_bias": [1]}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"), ({"logit_bias": {"5": "x"}}, "logit_bias"),
    ({"response_format": {"type": "xml"}}, "response_format"), ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": "yes"}}},
     "response_format.json_schema.strict"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "description": "d" * (70 << 10)}}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_object"}, "tools": [TOOL]}, "response_format"),
    ({"tools": "get_weather"}, "tools"), ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]"), ({"tools": [TOOL] * 129}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "extra": 1}}]}, "tools[0].function.extra"),
    ({"tools": [TOOL, TOOL]}, "tools[1].function.name"),
    ({"tool_choice": "auto"}, "tool_choice"), ({"tools": [TOOL], "tool_choice": "always"}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tools": [TOOL], "parallel_tool_calls": "no"}, "parallel_tool_calls"),
])
def test_decoding_fields_out_of_bounds_are_400(server, extra, param):
    error = refused(server, "POST", CHAT, chat_body(**extra), status=400, param=param)
    assert param.split("[")[0].split(".")[0] in error["message"]


@pytest.mark.parametrize("messages, param", [
    ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": "f"}], "messages[1].tool_calls"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"function": {"name": 5}}]}],
     "messages[1].tool_calls[0]"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}, {"role": "tool", "content": "x",
                                                                                  "tool_call_id": 7}],
     "messages[2].tool_call_id"),
    ([{"role": "tool", "content": "x", "tool_call_id": "c", "name": "f"}], "messages[0].name"),
])
def test_bad_tool_messages_are_400(server, messages, param):
    body = chat_body()
    body["messages"] = messages
    refused(server, "POST", CHAT, body, status=400, param=param)


@pytest.mark.parametrize("body, param", [
    ({"input": []}, "input"), ({"input": [[]]}, "input"), ({"input": 5}, "input"), ({"input": [[10**9]]}, "input"),
    ({"input": ["x"] * 2049}, "input"), ({"input": "hi", "encoding_format": "hex"}, "encoding_format"),
    ({"input": "hi", "dimensions": 0}, "dimensions"), ({"input": "hi", "dimensions": 10**6}, "dimensions"),
    ({"input": "hi", "pooling": "max"}, "pooling"), ({"input": "hi", "truncate": True}, "truncate"),
    ({"input": ["a", 5]}, "input"), ({"input": "word " * 100_000}, "input"),
])
def test_bad_embeddings_requests_are_400(server, body, param):
    refused(server, "POST", "/v1/embeddings", {"model": "demo", **body}, status=400, param=param)


def test_embeddings_unknown_model_is_404(server):
    refused(server, "POST", "/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"}, status=404,
            param="model", code="model_not_found")


@pytest.mark.parametrize("body, param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"), ({"store": True}, "store"),
    ({"input": 5}, "input"), ({"input": []}, "input"), ({"input": [{"type": "reasoning"}]}, "input[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input[0].content"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]"), ({"text": {"format": {"type": "xml"}}}, "text.format"),
    ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format.name"),
    ({"max_output_tokens": 0}, "max_output_tokens"), ({"instructions": 5}, "instructions"),
    ({"reasoning": {"effort": "high"}}, "reasoning"), ({"tool_choice": "auto"}, "tool_choice"),
    ({"truncation": "auto"}, "truncation"), ({"service_tier": "flex"}, "service_tier"),
])
def test_bad_responses_requests_are_400(server, body, param):
    refused(server, "POST", "/v1/responses", {"model": "demo", "input": "hi", "max_output_tokens": 2, **body},
            status=400, param=param)


@pytest.mark.parametrize("field, value", [("n", 1), ("logprobs", False), ("presence_penalty", 0),
                                          ("frequency_penalty", 0.0), ("logit_bias", {}), ("tools", None),
                                          ("response_format", {"type": "text"}), ("user", "alice")])
def test_fields_at_their_default_are_accepted(server, field, value):
    assert call(server, "POST", CHAT, chat_body(**{field: value})).status == 200


def test_unknown_field_is_refused_by_name(server):
    error = refused(server, "POST", CHAT, chat_body(temprature=0.5), status=400, param="temprature",
                    code="unknown_parameter")
    assert "temperature" in error["message"]   # the list of fields it takes helps spot the typo


@pytest.mark.parametrize("field, value", [("echo", True), ("suffix", "end"), ("best_of", 3), ("logprobs", 6),
                                          ("n", 0), ("logit_bias", {"x": 1}), ("presence_penalty", -3)])
def test_completions_unsupported_fields(server, field, value):
    body = {"model": "demo", "prompt": "Hi", "max_tokens": 2, field: value}
    refused(server, "POST", "/v1/completions", body, status=400, param=field)


@pytest.mark.parametrize("prompt", [["one", "two"], [], "", [1, "x"], {"text": "hi"}, [10**9]])
def test_completions_bad_prompts(server, prompt):
    refused(server, "POST", "/v1/completions", {"model": "demo", "prompt": prompt, "max_tokens": 2},
            status=400, param="prompt")


# ---------------------------------------------------------------- 400: messages
@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ("hello", "messages"),
    (None, "messages"),
    (["hello"], "messages[0]"),
    ([{"role": "critic", "content": "x"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
     "messages[0].content"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}], "messages[1].content"),
    ([{"role": "user", "content": "hi", "name": "bob"}], "messages[0].name"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x", "refusal": "no"}],
     "messages[1].refusal"),
    ([{"role": ["user"], "content": "x"}], "messages[0].role"),
])
def test_bad_messages_are_400(server, messages, param):
    body = chat_body()
    body["messages"] = messages
    refused(server, "POST", CHAT, body, status=400, param=param)


def test_missing_model_is_400(server):
    body = chat_body()
    del body["model"]
    refused(server, "POST", CHAT, body, status=400, param="model")


# ---------------------------------------------------------------- 404, 405
@pytest.mark.parametrize("path", [CHAT, "/v1/completions"])
def test_unknown_model_is_404(server, path):
    body = chat_body(model="gpt-4o") if path == CHAT else {"model": "gpt-4o", "prompt": "hi", "max_tokens": 2}
    error = refused(server, "POST", path, body, status=404, param="model", code="model_not_found")
    assert "gpt-4o" in error["message"] and "demo" in error["message"]


def test_unknown_model_retrieve_is_404(server):
    refused(server, "GET", "/v1/models/org/other-model", status=404, code="model_not_found")


@pytest.mark.parametrize("method, path", [("GET", "/v1/nope"), ("POST", "/v1/chat"), ("GET", "/v1"),
                                          ("DELETE", "/v1/engines")])
def test_unknown_route_is_404(server, method, path):
    refused(server, method, path, status=404, code="unknown_url")


@pytest.mark.parametrize("method, path", [("GET", CHAT), ("PUT", "/v1/completions"), ("DELETE", "/v1/models"),
                                          ("POST", "/health")])
def test_wrong_method_is_405(server, method, path):
    refused(server, method, path, b"{}" if method in ("PUT", "POST") else None, status=405,
            code="method_not_allowed")


# ---------------------------------------------------------------- 401
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"},
                                     {"Authorization": "Bearer"}, {"Authorization": f"Bearer {API_KEY[:-1]}"},
                                     {"Authorization": "Bearer \u00e9t\u00e9"}])
@pytest.mark.parametrize("method, path", [("POST", CHAT), ("GET", "/v1/models"), ("GET", "/metrics")])
def test_missing_or_wrong_key_is_401(server, headers, method, path):
    body = chat_body() if method == "POST" else None
    error = refused(server, method, path, body, key=None, headers=headers, status=401, code="invalid_api_key")
    assert error["type"] == "authentication_error"


def test_health_is_open_without_the_key(server):
    answer = call(server, "GET", "/health", key=None)
    assert answer.status == 200 and answer.json["status"] == "ok"


# ---------------------------------------------------------------- 413
def test_body_too_large_is_413(server):
    padding = "x" * MAX_BODY_BYTES
    error = refused(server, "POST", CHAT, chat_body(padding), status=413, code="request_too_large")
    assert str(MAX_BODY_BYTES) in error["message"]


def test_body_too_large_even_to_drain_is_413_at_once(server):
    # Only the headers are sent: the server must answer from Content-Length alone.
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {1 << 30}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"request_too_large"' in answer
    assert_serving(server)


def test_body_just_under_the_limit_is_parsed(server):
    body = chat_body()
    body["user"] = "u" * (MAX_BODY_BYTES - 200)
    assert call(server, "POST", CHAT, body).status == 200


# ---------------------------------------------------------------- context overflow
@pytest.mark.parametrize("stream", [False, True])
def test_context_overflow_is_400_with_the_numbers(server, cluster, stream):
    prompt_tokens = len(cluster.encode_chat(chat_body()["messages"]))
    error = refused(server, "POST", CHAT, chat_body(max_tokens=5000, stream=stream), status=400,
                    param="max_tokens", code="context_length_exceeded")
    message = error["message"]
    for number in (cluster.context_length, prompt_tokens, 5000, prompt_tokens + 5000,
                   cluster.context_length - prompt_tokens):
        assert str(number) in message, message


def test_long_prompt_overflows_the_completions_context(server, cluster):
    prompt = "word " * (cluster.context_length + 10)
    error = refused(server, "POST", "/v1/completions", {"model": "demo", "prompt": prompt, "max_tokens": 1},
                    status=400, code="context_length_exceeded")
    assert str(cluster.context_length) in error["message"]


def _chat_filling_the_context(cluster) -> list[dict]:
    """The longest "hi hi hi ..." user message whose prompt leaves at least one token of context."""
    def prompt_tokens(words: int) -> int:
        return len(cluster.encode_chat([{"role": "user", "content": "hi " * words}]))

    low, high = 1, cluster.context_length
    while low < high:
        words = (low + high + 1) // 2
        low, high = (words, high) if prompt_tokens(words) < cluster.context_length else (low, words - 1)
    return [{"role": "user", "content": "hi " * low}]


def test_chat_without_max_tokens_gets_the_rest_of_the_context(server, cluster):
    """OpenAI's rule: no max_tokens means up to the context's end, so a long prompt still fits."""
    messages = _chat_filling_the_context(cluster)
    room = cluster.context_length - len(cluster.encode_chat(messages))
    assert 1 <= room <= 4
    answer = call(server, "POST", CHAT, {"model": "demo", "messages": messages, "temperature": 0})
    assert answer.status == 200, answer.body
    assert answer.json["usage"]["completion_tokens"] <= room
    if answer.json["choices"][0]["finish_reason"] == "length":
        assert answer.json["usage"]["completion_tokens"] == room
    refused(server, "POST", CHAT, {"model": "demo", "messages": messages, "max_tokens": room + 1},
            status=400, code="context_length_exceeded")


# ---------------------------------------------------------------- metrics count refusals
def test_refusals_are_counted_in_metrics(server):
    def count_400() -> float:
        for line in call(server, "GET", "/metrics").body.decode().splitlines():
            if line.startswith('exo_lab_http_responses_total{code="400"}'):
                return float(line.split()[-1])
        return 0.0

    before = count_400()
    call(server, "POST", CHAT, b"{")
    assert count_400() == before + 1


# ---------------------------------------------------------------- error mapping (the 500 path)
def test_unexpected_exceptions_become_a_500_openai_body():
    error = api_error_from(ZeroDivisionError("boom"))
    assert error.status == 500 and error.type == "server_error"
    assert "boom" not in error.message          # internals stay in the server log
    assert api_error_from(ClusterError("stage 1 died")).status == 503
    request_error = api_error_from(RequestError("bad", param="top_p"))
    assert (request_error.status, request_error.param) == (400, "top_p")
    own = ApiError(418, "teapot", code="teapot")
    assert api_error_from(own) is own
    assert own.body() == {"error": {"message": "teapot", "type": "invalid_request_error", "param": None,
                                    "code": "teapot"}}


def test_a_full_queue_is_429_with_retry_after_and_hosts_are_redacted():
    from exo_lab.api.errors import redact
    from exo_lab.errors import QueueFull

    error = api_error_from(QueueFull("all 8 KV slots are busy", retry_after_s=2.5))
    assert (error.status, error.code, error.retry_after_s) == (429, "queue_full", 2.5)
    message = ("engine 1 (System-B.local, stage 0) stopped; inbox tcp://10.0.0.7:5555 and "
               "192.168.1.20:10101 unreachable")
    assert redact(message, {"system-b.local"}) == ("engine 1 (<host>, stage 0) stopped; inbox <address> "
                                                   "and <address> unreachable")
