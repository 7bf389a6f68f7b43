"""Sharing the cluster fairly, and nothing leaking between its users.

Policy (one process, a fake pipeline): a client with one request is served while another has 72
waiting; first come first served within a client; preempted requests get their tokens
unchanged; per-client caps refuse with the client's own numbers; cached prefixes are reused only
within one client and isolation key.

End to end (a real cluster and server): one client holding 300 connections and 200 queued
requests while 8 good clients chat (their success rate and p50 latency against an idle run), and
the prefix side channel (a probe's observable signals do not depend on another client's prompt).
"""
from __future__ import annotations

import asyncio
import http.client
import json
import re
import statistics
import time
import zlib

import pytest
from fixtures_api import API_KEY, call, server, wait_until  # noqa: F401 (fixture: the API on the module's cluster)
from tokenizers import Tokenizer, models

from exo_lab.api.tenants import ConnectionCounter, client_address, request_tenant
from exo_lab.coordinator.scheduler import Scheduler
from exo_lab.coordinator.tenants import Tenant, TenantLimits
from exo_lab.errors import QueueFull
from exo_lab.sampling import SamplingParams
from exo_lab.wire import NO_TOKEN, Forward, Free, Ping, Sampled

VOCAB = 512


class FakeTokenizer:
    """What the scheduler's text assembly needs: a ``tokenizers`` backend ("t0".."t511")."""

    backend_tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))


class FakePipe:
    """The stages, in one process: a KV cache of token ids per slot, and a next token that is a
    hash of every token in the slot up to the sampled position. So a request gets the tokens it
    gets alone only when the scheduler's slots, positions and reused prefixes are right."""

    def __init__(self, step_s: float = 0.001):
        self.step_s = step_s
        self.kv: dict[int, list[int]] = {}
        self._queue: asyncio.Queue = asyncio.Queue()

    async def send(self, message) -> None:
        if isinstance(message, Forward):
            asyncio.get_running_loop().call_later(self.step_s, self._queue.put_nowait, self.forward(message))
        elif isinstance(message, (Free, Ping)):
            self._queue.put_nowait(message)

    async def recv(self):
        return await self._queue.get()

    def close(self) -> None:
        pass

    def forward(self, message: Forward) -> Sampled:
        tokens = []
        for row, ids in zip(message.rows, message.tensor.tolist()):
            cache = self.kv.setdefault(row.slot, [])
            assert row.position <= len(cache), "a row starts past what its slot holds"
            cache[row.position:] = ids
            tokens.append(zlib.crc32(bytes(str(cache), "ascii")) % VOCAB if row.sample else NO_TOKEN)
        return Sampled(message.step_id, tuple(tokens), (0.1,))


def scheduler(pipe: FakePipe, max_batch: int, max_queued: int = 64) -> Scheduler:
    made = Scheduler(inbox=pipe, outbox=pipe, tokenizer=FakeTokenizer(), eos_token_ids=set(), context_length=4096,
                     check_alive=lambda: None, max_batch=max_batch, micro_batches=1, prefill_chunk=64,
                     max_queued=max_queued)
    made.start()
    return made


def params(tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=tokens, ignore_eos=True, temperature=0.0)


async def drain(sched: Scheduler, prompt: list[int], tokens: int, tenant: Tenant, log: list | None = None):
    out = []
    async for event in sched.stream(prompt, params(tokens), tenant):
        out.extend(event.token_ids)
        if log is not None and len(out) == 1:
            log.append(prompt[0])
    return out


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


A, B, C = Tenant("client-a"), Tenant("client-b"), Tenant("client-c")


def test_one_request_is_served_while_another_client_has_72_waiting():
    async def scenario():
        sched = scheduler(FakePipe(), max_batch=8)
        flood = [asyncio.ensure_future(drain(sched, [1, i], 60, A)) for i in range(72)]
        await asyncio.sleep(0.02)                       # A holds all 8 slots and 64 queue places
        assert sched.metrics.running == 8 and sched.metrics.queued == 64
        started = asyncio.get_running_loop().time()
        mine = await drain(sched, [2, 3], 5, B)       # its first waiting request always fits
        waited = asyncio.get_running_loop().time() - started
        done_of_a = sum(task.done() for task in flood)
        for task in flood:
            task.cancel()
        await asyncio.gather(*flood, return_exceptions=True)
        await sched.close()
        return mine, waited, done_of_a, sched.metrics.preempted_total

    mine, waited, done_of_a, preempted = run(scenario())
    assert len(mine) == 5
    assert done_of_a == 0, "B waited for A's requests to end"
    assert preempted >= 1
    print(f"B served in {waited * 1000:.0f} ms while A had 72 requests in")


def test_first_come_first_served_within_a_client_and_turns_across_clients():
    async def scenario():
        sched = scheduler(FakePipe(), max_batch=1)
        order: list[int] = []
        a = [asyncio.ensure_future(drain(sched, [10 + i, 1], 4, A, order)) for i in range(4)]
        await asyncio.sleep(0)
        b = [asyncio.ensure_future(drain(sched, [20 + i, 1], 4, B, order)) for i in range(4)]
        await asyncio.gather(*a, *b)
        await sched.close()
        return order

    order = run(scenario())
    assert [t for t in order if t < 20] == [10, 11, 12, 13]
    assert [t for t in order if t >= 20] == [20, 21, 22, 23]
    # one slot: A's first ran alone; then the two clients take turns
    assert order[:5] == [10, 20, 11, 21, 12], order


def test_preempted_requests_get_the_tokens_they_get_alone():
    prompts = [[30 + i] + list(range(1, 40 + 7 * i)) for i in range(6)]

    async def alone():
        sched = scheduler(FakePipe(), max_batch=1)
        tokens = [await drain(sched, prompt, 30, A) for prompt in prompts]
        await sched.close()
        return tokens

    async def contended():
        sched = scheduler(FakePipe(), max_batch=4)
        hog = [asyncio.ensure_future(drain(sched, prompt, 30, A)) for prompt in prompts]
        await asyncio.sleep(0.01)
        others = [await drain(sched, [99, 98, 97], 3, tenant) for tenant in (B, C, B)]
        tokens = await asyncio.gather(*hog)
        await sched.close()
        return tokens, others, sched.metrics.preempted_total

    expected = run(alone())
    together, others, preempted = run(contended())
    assert preempted >= 1
    assert together == expected
    assert others[0] == others[2]


def test_per_client_caps_refuse_with_the_clients_own_numbers():
    capped = Tenant("client-capped", limits=TenantLimits(max_running=1, max_queued=2))

    async def scenario():
        sched = scheduler(FakePipe(step_s=0.005), max_batch=4)
        mine = [asyncio.ensure_future(drain(sched, [40 + i], 50, capped)) for i in range(3)]
        await asyncio.sleep(0.02)
        running = sched.metrics.clients
        with pytest.raises(QueueFull) as refused:
            await drain(sched, [50], 2, capped)
        other = await drain(sched, [60], 2, B)              # a free slot: another client gets it
        for task in mine:
            task.cancel()
        await asyncio.gather(*mine, return_exceptions=True)
        await sched.close()
        return refused.value, other, running

    refused, other, clients = run(scenario())
    assert "your client has 2 requests queued, its limit (api.max_queued_per_client) is 2, and 1 running" \
        in str(refused)
    assert 1 <= refused.retry_after_s <= 60
    assert len(other) == 2
    assert clients == [{"client": capped.label, "running": 1, "queued": 2}]
    assert "capped" not in capped.label and len(capped.label) == 8


def test_cached_prefixes_are_reused_only_within_one_client_and_isolation_key():
    secret = [7] + list(range(100, 160))
    probe = secret[:40] + [1, 2, 3]

    async def scenario():
        pipe = FakePipe()
        sched = scheduler(pipe, max_batch=4)
        await drain(sched, secret, 2, A)
        reused = {}
        for name, tenant in (("other client", B), ("same client, other user", Tenant(A.client_id, "user-2")),
                             ("same client", A)):
            hits = sched.metrics.prefix_hits_total
            await drain(sched, probe, 2, tenant)
            reused[name] = (sched.metrics.prefix_hits_total - hits, sched.metrics.prefix_tokens_total)
        await sched.close()
        return reused

    reused = run(scenario())
    assert reused["other client"] == (0, 0)
    assert reused["same client, other user"] == (0, 0)
    assert reused["same client"] == (1, 40)


def test_a_client_is_its_address_and_accepted_key_and_isolation_narrows_only_reuse():
    limits = TenantLimits(max_running=2, max_queued=3)
    plain = request_tenant("10.0.0.7", None, None, None, limits)
    assert plain == Tenant("10.0.0.7", "", limits)
    keyed = request_tenant("10.0.0.7", "sk-team", None, None, limits)
    assert keyed.client_id.endswith("@10.0.0.7") and "sk-team" not in keyed.client_id
    narrowed = request_tenant("10.0.0.7", "sk-team", "alice", None, limits)
    assert narrowed.client_id == keyed.client_id and narrowed.scope != keyed.scope
    assert request_tenant("10.0.0.7", "sk-team", None, "alice", limits).scope != narrowed.scope
    # one host owns a whole IPv6 /64; an IPv4-mapped address is the IPv4 one
    assert client_address("2001:db8:1:2:aaaa::1") == client_address("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert client_address("::ffff:10.0.0.7") == "10.0.0.7"


def test_connections_are_counted_per_client():
    counter = ConnectionCounter(max_per_client=2)
    assert counter.open(("10.0.0.7", 5000)) and counter.open(("10.0.0.7", 5001))
    assert not counter.open(("10.0.0.7", 5002))
    assert counter.refusal(("10.0.0.7", 5002)).startswith(
        "your client holds 2 of its 2 open connections (api.max_connections_per_client)")
    assert counter.open(("10.0.0.8", 5000))               # another client still gets in
    counter.close(("10.0.0.7", 5000))
    assert counter.open(("10.0.0.7", 5003))
    for port in (5001, 5003):
        counter.close(("10.0.0.7", port))
    counter.close(("10.0.0.8", 5000))
    assert counter.held("10.0.0.7") == counter.held("10.0.0.8") == 0 and counter.refused == 1


# --------------------------------------------------------------------------- a real server

GOOD_CLIENTS = [f"127.0.0.{10 + i}" for i in range(8)]
HOG = "127.0.0.200"
HOG_CONNECTIONS, HOG_REQUESTS = 300, 200
CHATS_PER_CLIENT = 3


class Answer:
    def __init__(self, status: int, head: str, body: bytes, seconds: float):
        self.status, self.head, self.body, self.seconds = status, head, body, seconds

    @property
    def json(self):
        return json.loads(self.body)


async def post(port: int, path: str, body: dict, source: str, timeout_s: float = 60) -> Answer:
    """One HTTP request from the loopback address ``source``; status 0 when the connection failed."""
    started = time.perf_counter()
    payload = json.dumps(body).encode()
    head = {"Host": f"127.0.0.1:{port}", "Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json",
            "Content-Length": str(len(payload)), "Connection": "close"}
    request = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n"
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), 10)
        writer.write(request.encode() + payload)
        raw = await asyncio.wait_for(reader.read(), timeout_s)
    except (OSError, asyncio.TimeoutError):
        return Answer(0, "", b"", time.perf_counter() - started)
    finally:
        if writer is not None:
            writer.close()
    head_text, _, body_bytes = raw.partition(b"\r\n\r\n")
    status = int(head_text.split()[1]) if head_text.startswith(b"HTTP/") else 0
    return Answer(status, head_text.decode("latin-1"), body_bytes, time.perf_counter() - started)


def chat(content: str, max_tokens: int) -> dict:
    return {"model": "demo", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0}


async def good_clients(port: int) -> list[Answer]:
    async def one(index: int, source: str) -> list[Answer]:
        return [await post(port, "/v1/chat/completions", chat(f"Client {index} asks question {turn}.", 8), source)
                for turn in range(CHATS_PER_CLIENT)]

    answers = await asyncio.gather(*[one(i, source) for i, source in enumerate(GOOD_CLIENTS)])
    return [answer for client in answers for answer in client]


class Hog:
    """One client (one address) that keeps HOG_REQUESTS long requests going, retrying refusals
    at once, and holds idle connections up to HOG_CONNECTIONS in all; everything closed on stop."""

    def __init__(self, port: int):
        self.port = port
        self.statuses: dict[int, int] = {}
        self.messages: set[str] = set()
        self.without_retry_after = 0
        self.idle: list[asyncio.StreamWriter] = []
        self.stopping = asyncio.Event()

    async def run(self, ready: asyncio.Event) -> None:
        workers = [asyncio.ensure_future(self.keep_sending(i)) for i in range(HOG_REQUESTS)]
        await asyncio.sleep(1.0)                      # its requests fill what it may hold
        await self.hold_idle(HOG_CONNECTIONS - HOG_REQUESTS)
        ready.set()
        await self.stopping.wait()
        for writer in self.idle:
            writer.close()
        await asyncio.gather(*workers)

    async def keep_sending(self, index: int) -> None:
        while not self.stopping.is_set():
            answer = await post(self.port, "/v1/chat/completions", chat(f"Hog request {index}: write at length.", 1000),
                                HOG, timeout_s=3)      # then it hangs up and sends again
            self.statuses[answer.status] = self.statuses.get(answer.status, 0) + 1
            if answer.status in (429, 503):
                self.without_retry_after += "\r\nRetry-After: " not in answer.head
                self.messages.add(re.sub(r"has \d+ requests queued|and \d+ running", "...",
                                         answer.json["error"]["message"].split(";")[0]))
            await asyncio.sleep(0.1)

    async def hold_idle(self, count: int) -> None:
        for _ in range(count):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port, local_addr=(HOG, 0))
            except OSError:
                self.statuses[-1] = self.statuses.get(-1, 0) + 1
                continue
            self.idle.append(writer)


def p50(answers: list[Answer]) -> float:
    return statistics.median(answer.seconds for answer in answers)


def test_eight_good_clients_chat_while_one_holds_300_connections_and_200_requests(server, cluster):  # noqa: F811
    async def scenario():
        idle = await good_clients(server.port)
        hog = Hog(server.port)
        ready = asyncio.Event()
        hogging = asyncio.ensure_future(hog.run(ready))
        await asyncio.wait_for(ready.wait(), 30)
        load = dict(cluster.metrics.snapshot(), clients=list(cluster.metrics.clients))
        preempted = cluster.metrics.preempted_total
        contended = await good_clients(server.port)
        load["preempted"] = cluster.metrics.preempted_total - preempted
        hog.stopping.set()
        await hogging
        return idle, contended, hog, load

    idle, contended, hog, load = asyncio.run(scenario())
    ok = [answer for answer in contended if answer.status == 200]
    print(f"\nidle: {len(idle)} chats, p50 {p50(idle) * 1000:.0f} ms; with the hog: {len(ok)}/{len(contended)} "
          f"succeeded, p50 {p50(contended) * 1000:.0f} ms, max {max(a.seconds for a in contended) * 1000:.0f} ms")
    print(f"the hog's answers by status: {dict(sorted(hog.statuses.items()))}; its refusals: {sorted(hog.messages)}")
    print(f"load as the good clients start: running {load['running']}, queued {load['queued']}, clients "
          f"{load['clients']}; the hog's requests preempted for theirs: {load['preempted']}")
    assert all(answer.status == 200 for answer in idle)
    assert len(ok) == len(contended), [(a.status, a.body[:200]) for a in contended if a.status != 200]
    assert p50(contended) <= 10 * p50(idle) + 2.0
    assert hog.statuses.get(429, 0) > 0 and hog.without_retry_after == 0
    assert "the server is busy: your client ..., its limit (api.max_queued_per_client) is 16, ..." in hog.messages
    assert any("your client holds 64 of its 64 open connections" in message for message in hog.messages)
    # everything the hog held is given back
    assert wait_until(lambda: cluster.pipeline.scheduler.active_requests == 0, timeout_s=10)[0]


SECRET = "The vault code is 4817-2290-5563; keep it between us."
DECOY = "Lunch today is soup, bread and a pear; see you at one."
PROBE = "The vault code is 4817-22"       # a guess at the first digits
HITS = 'metrics exo_lab_prefix_cache_hits_total{model="demo"}'


def completion_from(api, source: str, prompt: str) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", api.port, timeout=60, source_address=(source, 0))
    try:
        connection.request("POST", "/v1/completions", json.dumps({"model": "demo", "prompt": prompt, "max_tokens": 4,
                                                                  "temperature": 0}),
                           {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
        answer = connection.getresponse()
        assert answer.status == 200
        return json.loads(answer.read())
    finally:
        connection.close()


# what varies from run to run whatever anyone sends: timings, memory, the display's text of them,
# and running means (their counters are compared)
NOISE = re.compile(r"(_s|_ms|_bytes|_fraction|_text|_seconds_sum|_milliseconds_sum|_per_second|"
                   r"_pause_seconds)(\{.*)?$|stage_mean_ms| mean_|^status display ")


def signals(api) -> dict:
    """Everything a client may read of the cluster, flattened to {name: value}, noise left out."""
    flat = {}
    for line in call(api, "GET", "/metrics").body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            flat["metrics " + name] = float(value)
    _flatten(call(api, "GET", "/v1/cluster/status").json, "status", flat)
    return {name: value for name, value in flat.items() if not NOISE.search(name)}


def _flatten(value, path: str, into: dict) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{path} {key}", into)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _flatten(item, f"{path} {index}", into)
    else:
        into[path] = value


def what_a_probe_sees(api, owner: str, prober: str, owners_prompt: str) -> tuple[dict, dict]:
    """The probe's answer (less id and time) and how every signal changed across it, after the
    owner's request with ``owners_prompt`` ran."""
    completion_from(api, owner, owners_prompt)
    before = signals(api)
    answer = completion_from(api, prober, PROBE)
    after = signals(api)
    changed = {name: _change(before.get(name), value) for name, value in after.items() if value != before.get(name)}
    return {k: v for k, v in answer.items() if k not in ("id", "created")}, changed


def _change(before, after):
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (before, after))
    return after - before if numbers else after


def test_a_probe_sees_the_same_whether_or_not_another_client_cached_the_secret(server):  # noqa: F811
    decoy_answer, decoy_changes = what_a_probe_sees(server, "127.0.0.41", "127.0.0.42", DECOY)
    secret_answer, secret_changes = what_a_probe_sees(server, "127.0.0.43", "127.0.0.44", SECRET)
    print(f"\nthe probe's answer: {secret_answer['usage']}; signals that changed across it: {len(secret_changes)}")
    assert secret_answer == decoy_answer
    assert secret_changes == decoy_changes
    assert not any("prefix_cache_tokens" in name or "prefix_tokens" in name for name in signals(server))
    assert HITS not in secret_changes
    # the same client does reuse its own prefix, and the counter shows it
    hits = signals(server)[HITS]
    completion_from(server, "127.0.0.43", PROBE)
    assert signals(server)[HITS] == hits + 1
