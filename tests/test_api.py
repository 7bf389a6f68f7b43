"""The OpenAI-compatible API through the official openai client, on a real 2-stage cluster."""
from __future__ import annotations

import concurrent.futures
import json
import socket
import threading
import time

import openai
import pytest

from fixtures_api import API_KEY, call, client, openai_client, server, wait_until  # noqa: F401 (fixtures)

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


def chat(client, stream=False, **kwargs):
    args = {"model": "demo", "messages": MESSAGES, "max_tokens": 12, "temperature": 0, **kwargs}
    return client.chat.completions.create(stream=stream, **args)


def streamed_chat(client, **kwargs):
    """(text, finish_reason, chunks) of a streamed chat completion."""
    chunks = list(chat(client, stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1, finish
    return text, finish[0], chunks


def streamed_completion(client, **kwargs):
    chunks = list(client.completions.create(model="demo", stream=True, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1, finish
    return text, finish[0], chunks


def test_models_list_and_retrieve(client):
    assert [m.id for m in client.models.list()] == ["demo"]
    model = client.models.retrieve("demo")
    assert model.id == "demo" and model.owned_by == "exo-lab"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("not-a-model")


def test_chat_completion_matches_cluster_generate(client, cluster):
    result = chat(client, max_tokens=10)
    assert result.object == "chat.completion" and result.model == "demo"
    choice = result.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    prompt_ids = cluster.encode_chat(MESSAGES)
    direct = cluster.generate(prompt_ids, max_new_tokens=10)
    assert choice.message.content == direct.text
    assert result.usage.prompt_tokens == len(prompt_ids)
    assert result.usage.completion_tokens == 10
    assert result.usage.total_tokens == len(prompt_ids) + 10


def test_text_parts_content_equals_string_content(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]}]
    plain = [{"role": "user", "content": "Name a colour."}]
    assert chat(client, messages=parts).choices[0].message.content == chat(client, messages=plain).choices[0].message.content


def test_streamed_chat_equals_non_streamed(client):
    whole = chat(client, max_tokens=16)
    text, finish, chunks = streamed_chat(client, max_tokens=16)
    assert text == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason == "length"
    assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks), "no usage chunk unless include_usage is asked for"


def test_stream_include_usage(client, cluster):
    text, finish, chunks = streamed_chat(client, max_tokens=9, stream_options={"include_usage": True})
    *content_chunks, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert all(c.usage is None for c in content_chunks)
    prompt_tokens = len(cluster.encode_chat(MESSAGES))
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens,
            usage_chunk.usage.total_tokens) == (prompt_tokens, 9, prompt_tokens + 9)
    assert finish == "length"


def test_completions_streamed_and_not(client, cluster):
    whole = client.completions.create(model="demo", prompt="The cluster", max_tokens=12, temperature=0)
    assert whole.object == "text_completion"
    assert whole.choices[0].text == cluster.generate("The cluster", max_new_tokens=12).text
    assert whole.usage.prompt_tokens == len(cluster.encode("The cluster"))
    assert whole.usage.completion_tokens == 12
    text, finish, chunks = streamed_completion(client, prompt="The cluster", max_tokens=12, temperature=0,
                                               stream_options={"include_usage": True})
    assert (text, finish) == (whole.choices[0].text, "length")
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []


def test_completions_default_max_tokens_is_openais_16(client):
    assert client.completions.create(model="demo", prompt="Hi", temperature=0).usage.completion_tokens == 16


def test_completions_take_token_ids(client, cluster):
    ids = cluster.encode("The cluster")
    by_ids = client.completions.create(model="demo", prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(model="demo", prompt="The cluster", max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def _stop_string(text: str) -> tuple[str, int]:
    """A 3-character piece from the second half of text, first seen there (so it really triggers)."""
    for index in range(len(text) // 2, len(text) - 3):
        piece = text[index:index + 3]
        if text.find(piece) == index and piece.strip() and "\ufffd" not in piece:
            return piece, index
    pytest.fail(f"no usable stop string in {text!r}")


def test_stop_sequence_cuts_the_text(client):
    free = chat(client, max_tokens=24).choices[0].message.content
    stop, index = _stop_string(free)
    stopped = chat(client, max_tokens=24, stop=[stop, "never-appears-xyz"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == free[:index]
    text, finish, _ = streamed_chat(client, max_tokens=24, stop=stop)
    assert (text, finish) == (free[:index], "stop")


def test_completions_stop_sequence(client):
    free = client.completions.create(model="demo", prompt="Once", max_tokens=24, temperature=0).choices[0].text
    stop, index = _stop_string(free)
    stopped = client.completions.create(model="demo", prompt="Once", max_tokens=24, temperature=0, stop=stop)
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == (free[:index], "stop")


def test_seed_makes_sampling_reproducible(client):
    first = chat(client, max_tokens=16, temperature=1.0, top_p=0.95, seed=1234).choices[0].message.content
    again = chat(client, max_tokens=16, temperature=1.0, top_p=0.95, seed=1234).choices[0].message.content
    other = chat(client, max_tokens=16, temperature=1.0, top_p=0.95, seed=4321).choices[0].message.content
    greedy = chat(client, max_tokens=16).choices[0].message.content
    assert first == again
    assert other != first and greedy not in (first, other)   # the seed and the temperature are honoured


def test_top_k_extension_is_honoured(client):
    # top_k=1 keeps only the most likely token: sampling at any temperature becomes greedy.
    greedy = chat(client, max_tokens=12).choices[0].message.content
    top1 = chat(client, max_tokens=12, temperature=1.5, seed=7, extra_body={"top_k": 1})
    assert top1.choices[0].message.content == greedy


def test_api_key_refused_and_accepted(server):
    for wrong in ("wrong-key", API_KEY + "x"):
        with openai.OpenAI(base_url=server.url + "/v1", api_key=wrong, max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
            with pytest.raises(openai.AuthenticationError):
                bad.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2)
    with openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0) as good:
        assert good.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2).choices


def test_concurrent_streams_each_equal_their_solo_run(client):
    prompts = ["Tell me about stars.", "What is a pipeline?", "Count to five.", "Say something odd."]

    def run(prompt: str, stream: bool):
        messages = [{"role": "user", "content": prompt}]
        if not stream:
            return chat(client, messages=messages, max_tokens=32).choices[0].message.content, None
        barrier.wait()
        times, texts = [], []
        for chunk in chat(client, stream=True, messages=messages, max_tokens=32):
            times.append(time.monotonic())
            texts.append(chunk.choices[0].delta.content or "")
        return "".join(texts), (times[0], times[-1])

    solo = [run(p, stream=False)[0] for p in prompts]
    assert len(set(solo)) == len(prompts), "the prompts must give different answers for this test to mean anything"
    barrier = threading.Barrier(len(prompts))
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(lambda p: run(p, stream=True), prompts))
    assert [text for text, _ in together] == solo
    windows = [window for _, window in together]
    overlapping = [any(a[0] < b[1] and b[0] < a[1] for b in windows if b is not a) for a in windows]
    assert all(overlapping), f"the streams did not run at the same time: {windows}"


def _stage_rows(cluster) -> list[dict]:
    return [row for row in cluster.status()["engines"] if "stage_index" in row]


def _all_stages_free(cluster) -> bool:
    return all(row["active_requests"] == 0 for row in _stage_rows(cluster)) and cluster.metrics.running == 0


def _all_stages_busy(cluster) -> bool:
    return all(row["active_requests"] == 1 for row in _stage_rows(cluster))


@pytest.fixture(scope="module")
def long_messages(cluster) -> list[dict]:
    """A conversation whose greedy answer runs past 256 tokens (no early end of sequence), so a
    request with a large max_tokens is surely still generating when the test hangs up."""
    for content in ("Tell me a long story.", "Count to a thousand.", "Hello", "Describe the sea.", "Why?"):
        messages = [{"role": "user", "content": content}]
        if cluster.generate(cluster.encode_chat(messages), max_new_tokens=256).finish_reason == "length":
            return messages
    pytest.fail("every candidate prompt reaches end of sequence within 256 tokens")


def _send_raw_chat(port: int, messages: list[dict], **fields) -> socket.socket:
    """A chat request written by hand on a socket the test can close whenever it likes."""
    body = json.dumps({"model": "demo", "messages": messages, "temperature": 0, **fields}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head.encode() + body)
    return sock


def _read_events(sock: socket.socket, count: int) -> bytes:
    received = b""
    while received.count(b"data: ") < count:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the stream early: {received!r}"
        received += chunk
    return received


def _assert_freed_within_1s(cluster, aborted_before: int) -> None:
    left = time.monotonic()
    freed, _ = wait_until(lambda: _all_stages_free(cluster), 1.0)
    waited_s = time.monotonic() - left
    assert freed and waited_s < 1.0, f"stages still hold the request {waited_s:.2f} s later: {_stage_rows(cluster)}"
    assert cluster.metrics.requests_finished.get("aborted", 0) == aborted_before + 1
    assert cluster.metrics.in_flight == 0


def test_disconnect_mid_stream_frees_every_stage_at_once(server, cluster, long_messages):
    aborted_before = cluster.metrics.requests_finished.get("aborted", 0)
    sock = _send_raw_chat(server.port, long_messages, max_tokens=1500, stream=True)
    assert _read_events(sock, 3).startswith(b"HTTP/1.1 200")     # the role chunk and two content chunks
    assert _all_stages_busy(cluster), _stage_rows(cluster)
    sock.close()
    _assert_freed_within_1s(cluster, aborted_before)
    assert_serving_openai(server)


def test_disconnect_while_waiting_for_a_whole_completion_frees_every_stage(server, cluster, long_messages):
    aborted_before = cluster.metrics.requests_finished.get("aborted", 0)
    sock = _send_raw_chat(server.port, long_messages, max_tokens=1500)
    busy, _ = wait_until(lambda: _all_stages_busy(cluster), 10.0)
    assert busy, _stage_rows(cluster)
    sock.close()
    _assert_freed_within_1s(cluster, aborted_before)
    assert_serving_openai(server)


def test_stopping_a_server_cancels_its_streams(cluster, long_messages):
    from exo_lab.api import start_server

    # A second server on the same cluster (Cluster.serve would replace the module's one).
    extra = cluster.run_coroutine(start_server(cluster, host="127.0.0.1", port=0, api_key=API_KEY))
    aborted_before = cluster.metrics.requests_finished.get("aborted", 0)
    sock = _send_raw_chat(extra.port, long_messages, max_tokens=1500, stream=True)
    _read_events(sock, 2)
    started = time.monotonic()
    extra.stop()
    assert time.monotonic() - started < 2.0
    _assert_freed_within_1s(cluster, aborted_before)
    sock.settimeout(5)
    while sock.recv(65536):          # the server closed the connection: recv reaches the end
        pass
    sock.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", extra.port), timeout=2).close()


def test_an_empty_or_unsendable_api_key_is_refused():
    import asyncio

    from exo_lab.api import start_server
    from exo_lab.errors import ConfigError

    for key in ("", "two words", "cl\u00e9", "line\nbreak"):
        with pytest.raises(ConfigError, match="api_key=None"):
            asyncio.run(start_server(None, host="127.0.0.1", port=0, api_key=key))


def assert_serving_openai(server) -> None:
    with openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0) as fresh:
        assert fresh.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2).choices


def test_health_and_metrics(server, client):
    chat(client, max_tokens=3)
    health = call(server, "GET", "/health", key=None)         # open without the key
    assert (health.status, health.json) == (200, {"status": "ok", "state": "serving", "model": "demo"})
    metrics = call(server, "GET", "/metrics")
    assert metrics.status == 200
    assert metrics.headers["Content-Type"].startswith("text/plain; version=")
    text = metrics.body.decode()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
              for line in text.splitlines() if line and not line.startswith("#")}
    assert values['exo_lab_requests_total{model="demo"}'] >= 1
    assert values['exo_lab_tokens_generated_total{model="demo"}'] >= 3
    assert values['exo_lab_time_to_first_token_seconds_count{model="demo"}'] >= 1
    assert 'exo_lab_errors_total{model="demo"}' in values and 'exo_lab_tokens_per_second{model="demo"}' in values
    assert values['exo_lab_stage_forward_milliseconds_count{model="demo",stage="1"}'] >= 3
    assert values['exo_lab_http_responses_total{code="200"}'] >= 1
    assert call(server, "GET", "/metrics", key=None).status == 401


# ---------------------------------------------------------------- served model names
SERVED_NAMES = ("llama-70b", "gpt-4o")


@pytest.fixture(scope="module")
def named(cluster):
    """(server, openai client) of a second server on the module's cluster that answers to
    SERVED_NAMES, as `--served-model-name llama-70b --served-model-name gpt-4o` makes it."""
    from exo_lab.api import start_server

    served = cluster.run_coroutine(start_server(cluster, host="127.0.0.1", port=0, api_key=API_KEY,
                                            served_model_names=SERVED_NAMES))
    with openai_client(served) as made:
        yield served, made
    served.stop()


@pytest.fixture(scope="module")
def named_client(named):
    return named[1]


def test_models_lists_the_served_names_primary_first(named_client):
    models = list(named_client.models.list())
    assert [m.id for m in models] == list(SERVED_NAMES)
    assert named_client.models.retrieve("gpt-4o").id == "gpt-4o"
    with pytest.raises(openai.NotFoundError):
        named_client.models.retrieve("demo")        # as vLLM: the names replace the model id


@pytest.mark.parametrize("name", SERVED_NAMES)
def test_an_openai_app_calls_the_model_by_a_served_name(named_client, cluster, name):
    result = named_client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=6, temperature=0)
    assert result.model == name                     # the reply echoes the name the client sent
    assert result.choices[0].message.content == cluster.generate(cluster.encode_chat(MESSAGES), max_new_tokens=6).text


def test_served_names_stream_and_complete(named_client):
    chunks = list(named_client.completions.create(model="llama-70b", prompt="Once upon", max_tokens=3, stream=True))
    assert chunks and {c.model for c in chunks} == {"llama-70b"}


def test_an_unknown_name_is_404_naming_the_served_ones(named_client, named):
    with pytest.raises(openai.NotFoundError) as refused:
        named_client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2)
    message = refused.value.body["message"]
    assert "'demo'" in message and "'llama-70b', 'gpt-4o'" in message
    assert call(named[0], "GET", "/health", key=None).json == {"status": "ok", "state": "serving", "model": "llama-70b"}
