"""The step scheduler: continuous batching over the pipeline, on the coordinator.

One loop decides, step by step, what runs (as vLLM's scheduler does; the stages just execute the
batch they are given):

- **KV slots.** Every stage holds ``max_batch`` KV slots (allocated at load). A request owns a
  slot from admission to its end; beyond ``max_batch`` running requests, new ones wait, and past
  ``max_queued`` waiting ones :class:`~exo_lab.errors.QueueFull` (the API: 429).
- **Tenants** (:mod:`~exo_lab.coordinator.tenants`). Every request belongs to one (an API
  client; :data:`~exo_lab.coordinator.tenants.LOCAL` in a notebook). A tenant has at most its
  ``max_queued`` requests waiting (QueueFull naming its own limit) and holds at most its
  ``max_running`` slots; a tenant's first waiting request fits even when ``max_queued`` others
  wait, so no one client's queue shuts the rest out. Free slots go to the waiting tenant that
  holds the fewest (first come first served within a tenant); and while a tenant waits holding
  two or more slots fewer than another, one of that other's requests is **preempted**: its slot
  is taken back, and it waits at the head of its tenant's queue to replay its tokens, as after a
  failover (the same tokens: draws depend only on seed and position).
- **Steps.** Running requests with one token to feed (decoding) go down the pipe together as one
  batch of rows (per-row slots, positions and sampling settings); new requests join at the next
  step, finished or cancelled ones leave at once.
- **Chunked prefill.** A prompt is fed in chunks, one chunk in flight at a time, alternating with
  decode steps, so streams already decoding keep flowing. While others decode, a chunk is sized
  so it costs about PREFILL_GAP_RATIO decode steps (both measured as the steps come back), at
  least MIN_PREFILL_CHUNK and at most ``prefill_chunk`` tokens; with nobody decoding, a chunk
  is ``prefill_chunk`` tokens.
- **Micro-batches.** Up to ``micro_batches`` steps are in flight at once (default: one per
  stage, or one when stages sharing a PC would oversubscribe its cores, see
  :func:`~exo_lab.coordinator.pipeline.default_micro_batches`), so with K stages on K PCs every
  PC works at once; the decoding requests are split into that many groups.
- **Prefix reuse.** A finished request leaves its tokens' KV in its slot. A new request takes
  the free slot of its own tenant scope (tenant and isolation key) sharing the longest token
  prefix with its prompt and prefills only the rest (a chat's next turn); otherwise the least
  recently used free slot. Never another scope's: what it cached would show in the time to first
  token (a secret in one user's prompt could be guessed token by token by another).

However a request ends (finished, error, client gone, task cancelled) its slot is freed at once,
or when its step in flight comes back, and a FREE goes down the pipe for the stages' books.

- **Failover.** When a stage's engine is lost (gone from the controller, its process dead, or a
  step in flight past ``step_timeout_s``: hung), the scheduler suspends (:meth:`suspend`) and
  calls ``on_failure(reason)``: every running request goes back to the head of the queue with its
  KV forgotten and its tokens kept. The cluster re-plans on the survivors and rewires the
  scheduler to the new pipeline (:meth:`rewire`); each request then replays its prompt and the tokens generated
  so far as a prefill and goes on. Sampling draws depend only on (seed, position), so the tokens
  do not depend on whether a failure happened. Without ``on_failure``, or when the survivors
  cannot hold the model, every request ends with the error.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from ..errors import ClusterError, QueueFull, RequestError
from ..sampling import SamplingParams, SamplingSettings, StreamEvent
from ..wire import Error, Forward, FrameError, Free, Ping, Row, Sampled
from .metrics import Metrics
from .tenants import LOCAL, FairQueue, Tenant
from .text import TextAssembler

logger = logging.getLogger(__name__)

# How long a request may wait for its next token before the engines' liveness is checked.
STALL_CHECK_S = 0.5
# Bounds of the Retry-After a refused request is told (its tenant's next request end, estimated).
RETRY_AFTER_S = (1.0, 60.0)
CLIENTS_SHOWN = 16          # the most loaded tenants listed in the status
# A prefill chunk next to decoding streams costs about this many decode steps: their gap
# between tokens stays within a small multiple of the usual one while a long prompt prefills.
PREFILL_GAP_RATIO = 1.0
MIN_PREFILL_CHUNK = 16
FIRST_PREFILL_CHUNK = 64    # before any step was timed
_EMA = 0.3                  # weight of the newest timing in the running averages


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    params: SamplingParams
    settings: SamplingSettings
    tenant: Tenant = LOCAL
    events: asyncio.Queue = field(default_factory=asyncio.Queue)   # token ids, or an exception
    generated: list[int] = field(default_factory=list)
    slot: int | None = None
    kv_len: int = 0             # positions whose keys and values its slot holds
    in_flight: bool = False
    done: bool = False          # no more steps: finished, cancelled or failed
    preempting: bool = False    # gives its slot back when its step in flight returns

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def to_feed(self) -> int:
        """Tokens not yet in the KV: the prompt (or its unshared rest), then the last sample."""
        return len(self.prompt) + len(self.generated) - self.kv_len


@dataclass(eq=False)
class _Step:
    requests: list[_Request]
    fed: int                    # tokens per row
    sample: list[bool]
    prefill: bool


class Scheduler:
    """Owns the coordinator's data-plane sockets, the KV slots and every request in flight."""

    def __init__(self, *, inbox, outbox, tokenizer, eos_token_ids: set[int], context_length: int,
                 check_alive: Callable[[], str | None], max_batch: int = 1, micro_batches: int = 1,
                 prefill_chunk: int = 256, max_queued: int = 64, step_timeout_s: float = 60.0,
                 on_failure: Callable[[str], None] | None = None):
        self.inbox = inbox
        self.outbox = outbox
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.context_length = context_length
        self.check_alive = check_alive
        self.max_batch = max_batch
        self.micro_batches = max(1, micro_batches)
        self.prefill_chunk = max(1, prefill_chunk)
        self.max_queued = max_queued
        self.step_timeout_s = step_timeout_s
        self.on_failure = on_failure
        self.suspended_since: float | None = None      # a failover is under way since then
        self.metrics = Metrics(kv_slots=max_batch)
        self.failure: str | None = None
        self._waiting = FairQueue()
        self._running: list[_Request] = []
        self._in_flight: dict[int, _Step] = {}
        # free slot -> (tenant scope, the tokens whose KV it still holds), least recently freed first
        self._free_slots: collections.OrderedDict[int, tuple[tuple, list[int]]] = _empty_slots(max_batch)
        self._pings: dict[int, asyncio.Future] = {}
        self._freed: dict[int, asyncio.Event] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._decode_step_ms: float | None = None       # running averages of the pipeline's work
        self._prefill_token_ms: float | None = None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._receive_loop()), asyncio.ensure_future(self._step_loop())]

    def suspend(self, reason: str) -> None:
        """Stop sending steps; put every running request back at the head of the queue with its
        KV forgotten (its prompt and generated tokens are replayed after :meth:`rewire`)."""
        if self.suspended_since is not None:
            return
        logger.warning("pipeline lost (%s): %d request(s) will be replayed", reason, len(self._running))
        self.suspended_since = time.perf_counter()
        self.metrics.failover(len([r for r in self._running if not r.done]))
        for request in reversed(self._running):
            request.in_flight, request.kv_len, request.slot, request.preempting = False, 0, None, False
            if not request.done:
                self._waiting.appendleft(request)
        self._running.clear()
        self._in_flight.clear()
        self._free_slots = _empty_slots(self.max_batch)
        for event in self._freed.values():
            event.set()
        self._freed.clear()

    async def rewire(self, inbox, outbox, micro_batches: int | None = None) -> None:
        """Go on over a new pipeline (after :meth:`suspend`): its sockets (and its number of
        micro-batches) replace the old ones, and the queued requests are admitted and replayed."""
        await self._stop_tasks()
        self.inbox, self.outbox = inbox, outbox
        if micro_batches is not None:
            self.micro_batches = max(1, micro_batches)
        self.failure = None
        self.metrics.resumed(time.perf_counter() - self.suspended_since if self.suspended_since else 0.0)
        self.suspended_since = None
        self.start()
        self._wake.set()

    def abort(self, error: BaseException) -> None:
        """End every request with ``error`` (the survivors cannot hold the model)."""
        self.failure = str(error)
        self._fail_all(error)

    async def close(self) -> None:
        self._fail_all(ClusterError("the cluster is shutting down"))
        # let the FREEs already on their way come back, so no stage blocks sending to a closed inbox
        waits = [asyncio.ensure_future(event.wait()) for event in self._freed.values()]
        if waits:
            await asyncio.wait(waits, timeout=2.0)
            for wait in waits:
                wait.cancel()
        await self._stop_tasks()

    async def _stop_tasks(self) -> None:
        """End the receive and step loops and close this pipeline's sockets."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self.inbox.close()
        self.outbox.close()

    @property
    def active_requests(self) -> int:
        return len(self._running) + len(self._waiting)

    # ----------------------------------------------------------------- requests
    def check_request(self, prompt_ids: list[int], params: SamplingParams, tenant: Tenant = LOCAL) -> None:
        """Raise RequestError when the request cannot run, QueueFull when it may not wait (before
        anything is sent)."""
        if self.failure:
            raise ClusterError(self.failure)
        if not prompt_ids:
            raise RequestError("the prompt is empty: it must contain at least one token", param="messages")
        needed = len(prompt_ids) + params.max_new_tokens
        if needed > self.context_length:
            raise RequestError(
                f"this model's context is {self.context_length} tokens, but the request needs "
                f"{needed} ({len(prompt_ids)} in the prompt + {params.max_new_tokens} to generate); "
                f"shorten the prompt or lower max_tokens to at most "
                f"{max(self.context_length - len(prompt_ids), 0)}", param="max_tokens")
        self._check_queue(tenant)

    def _check_queue(self, tenant: Tenant) -> None:
        """QueueFull when ``tenant`` may not have one more request waiting (module docstring)."""
        mine = self._waiting.waiting(tenant.client_id)
        cap = tenant.limits.max_queued
        if cap is not None and mine >= cap:
            raise QueueFull(f"your client has {mine} requests queued, its limit "
                            f"(api.max_queued_per_client) is {cap}, and {self._held_by(tenant.client_id)} "
                            f"running; send the next one when one of them has ended",
                            self._retry_after_s(tenant))
        if len(self._waiting) >= self.max_queued and (mine or not self.max_queued):
            raise QueueFull(f"all {self.max_batch} KV slots are busy and {len(self._waiting)} requests "
                            f"are already waiting (max_queued {self.max_queued}); retry shortly",
                            self._retry_after_s(tenant))

    def _retry_after_s(self, tenant: Tenant) -> float:
        """About when a slot frees for ``tenant``: the end of its (else anyone's) running request
        with the fewest tokens left, at the measured decode pace."""
        running = [r for r in self._running if not r.done]
        mine = [r for r in running if r.tenant.client_id == tenant.client_id] or running
        tokens_left = min((r.params.max_new_tokens - len(r.generated) for r in mine), default=1)
        seconds = tokens_left * (self._decode_step_ms or 100.0) / 1000
        return min(max(seconds, RETRY_AFTER_S[0]), RETRY_AFTER_S[1])

    async def stream(self, prompt_ids: list[int], params: SamplingParams,
                     tenant: Tenant = LOCAL) -> AsyncIterator[StreamEvent]:
        """Generate for one request of ``tenant``, yielding text deltas; the last event has
        finish_reason. Raises RequestError, or QueueFull (past the queue caps), at the first event."""
        self.check_request(prompt_ids, params, tenant)
        # every step carries the same settings; an unseeded request gets its own random seed
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        request = _Request(list(prompt_ids), params, params.settings(seed), tenant)
        started = time.perf_counter()
        assembler = TextAssembler(self.tokenizer, params.stop)
        self.metrics.request_started()
        self._waiting.append(request)
        self._admit()                     # at once when a slot is free: the queue holds only the rest
        self._wake.set()
        finish_reason = None
        try:
            for step in range(params.max_new_tokens):
                token_id, stage_ms = await self._next_token(request)
                if step == 0:
                    self.metrics.first_token(time.perf_counter() - started)
                self.metrics.token(stage_ms)
                is_eos = token_id in self.eos_token_ids and not params.ignore_eos
                delta = "" if is_eos else assembler.add(token_id)
                finish_reason = _finish_reason(is_eos, assembler.stopped, step, params)
                if finish_reason is not None:
                    if not assembler.stopped:
                        delta += assembler.flush()   # nothing can complete a stop string any more
                    yield StreamEvent(delta, [] if is_eos else [token_id], finish_reason)
                    return
                yield StreamEvent(delta, [token_id])
        except BaseException as exc:
            if not isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
                self.metrics.error()
            raise
        finally:
            self.metrics.request_finished(finish_reason, time.perf_counter() - started)
            self._end(request)

    async def _next_token(self, request: _Request) -> tuple[int, tuple[float, ...]]:
        waited = 0.0
        while True:
            try:
                event = await asyncio.wait_for(request.events.get(), STALL_CHECK_S)
            except asyncio.TimeoutError:
                waited = waited + STALL_CHECK_S if request.in_flight else 0.0
                self._check_stalled(waited)
                continue
            if isinstance(event, BaseException):
                raise event
            return event

    def _end(self, request: _Request) -> None:
        """The consumer is done with ``request`` (finished, gone or failed): free what it holds."""
        request.done = True
        if request.slot is None:
            if request in self._waiting:
                self._waiting.remove(request)
        elif not request.in_flight:
            self._release(request)          # else: when its step comes back
        self._wake.set()

    # ----------------------------------------------------------------- slots
    def _admit(self) -> None:
        """Free slots to waiting requests, fairly across tenants; then, while a tenant waits with
        far fewer slots than another holds, one slot taken back from that other (preemption)."""
        while True:
            while self._free_slots:
                request = self._waiting.pop(self._held())
                if request is None:
                    return
                self._start(request)
            if not self._preempt_one():
                return

    def _start(self, request: _Request) -> None:
        request.slot, request.kv_len = self._take_slot(request)
        if request.kv_len:
            self.metrics.prefix_hit(request.kv_len)
        self._running.append(request)

    def _held(self) -> dict[str, int]:
        """client_id -> KV slots its live requests hold."""
        return collections.Counter(r.tenant.client_id for r in self._running if not r.done)

    def _held_by(self, client_id: str) -> int:
        return sum(1 for r in self._running if not r.done and r.tenant.client_id == client_id)

    def _preempt_one(self) -> bool:
        """Preempt the cheapest request (fewest positions in its KV, not in flight first) of the
        tenant holding the most slots, when a waiting tenant holds at least two fewer; one at a
        time. True when its slot is free now (else when its step in flight returns)."""
        if not self._waiting or any(r.preempting for r in self._running):
            return False
        held = self._held()
        waiter = self._waiting.next_tenant(held)
        if waiter is None or not held:
            return False
        hog = max(held, key=held.get)
        if held[hog] - held.get(waiter, 0) < 2:
            return False
        victim = min((r for r in self._running if not r.done and r.tenant.client_id == hog),
                     key=lambda r: (r.in_flight, r.kv_len))
        victim.preempting = True
        self.metrics.preempted()
        if victim.in_flight:
            return False
        self._requeue(victim)
        return True

    def _requeue(self, request: _Request) -> None:
        """A preempted request gives its slot back (the KV stays there for its own scope) and waits
        at the head of its tenant's queue; it replays its tokens when admitted again."""
        request.preempting = False
        self._release(request)
        request.kv_len = 0
        self._waiting.appendleft(request)

    def _client_load(self) -> list[dict]:
        """Per tenant with requests: its label, KV slots held and requests waiting; the most
        loaded CLIENTS_SHOWN, for the status (no prompt, no address, no key)."""
        load: dict[str, list[int]] = {}
        for request in self._running:
            if not request.done:
                load.setdefault(request.tenant.label, [0, 0])[0] += 1
        for tenant, waiting in self._waiting.tenants():
            load.setdefault(tenant.label, [0, 0])[1] += waiting
        rows = sorted(load.items(), key=lambda item: (-sum(item[1]), item[0]))[:CLIENTS_SHOWN]
        return [{"client": label, "running": running, "queued": queued} for label, (running, queued) in rows]

    def _take_slot(self, request: _Request) -> tuple[int, int]:
        """(slot, reusable positions): the free slot of the request's own scope whose KV shares the
        longest prefix with its tokens (at least one token is always fed), else the least recently
        freed one."""
        best_slot, best = next(iter(self._free_slots)), 0
        tokens = request.tokens
        for slot, (scope, cached) in self._free_slots.items():
            if scope != request.tenant.scope:
                continue
            shared = _common_prefix(cached, tokens, len(tokens) - 1)
            if shared > best:
                best_slot, best = slot, shared
        del self._free_slots[best_slot]
        return best_slot, best

    def _release(self, request: _Request) -> None:
        slot, request.slot = request.slot, None
        if slot is None:
            return
        if request in self._running:
            self._running.remove(request)
        # most recently freed last
        self._free_slots[slot] = (request.tenant.scope, request.tokens[:request.kv_len])
        message_id = secrets.randbits(63)
        self._freed[message_id] = asyncio.Event()
        asyncio.ensure_future(self._send(Free(message_id, slot)))

    # ----------------------------------------------------------------- steps
    async def _step_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.suspended_since is not None:
                continue
            self._admit()
            self.metrics.set_load(len(self._running), len(self._waiting), self._client_load())
            for step in self._next_steps():
                await self._launch(step)

    def _next_steps(self) -> list[_Step]:
        """The steps to send now: a prefill chunk in a lane of its own (one at a time, so decode
        steps never wait for a second one), and decode groups up to ``micro_batches`` in flight."""
        ready = [r for r in self._running if not r.in_flight and not r.done]
        steps = []
        prefill = [r for r in ready if r.to_feed > 1]
        if prefill and not any(step.prefill for step in self._in_flight.values()):
            steps.append(self._prefill_step(prefill[0]))
        decode = [r for r in ready if r.to_feed == 1]
        # the decoding requests, split into one group per micro-batch
        size = max(1, math.ceil(sum(not r.done for r in self._running) / self.micro_batches))
        in_flight = sum(not step.prefill for step in self._in_flight.values())
        while decode and in_flight < self.micro_batches:
            group, decode = decode[:size], decode[size:]
            steps.append(_Step(group, 1, [True] * len(group), False))
            in_flight += 1
        return steps

    def _prefill_step(self, request: _Request) -> _Step:
        fed = min(self._chunk_size(), request.to_feed)
        return _Step([request], fed, [fed == request.to_feed], True)

    def _chunk_size(self) -> int:
        decoding = any(r.generated and not r.done for r in self._running)
        if not decoding:
            return self.prefill_chunk
        if self._decode_step_ms is None or self._prefill_token_ms is None:
            return min(self.prefill_chunk, FIRST_PREFILL_CHUNK)
        budget = int(PREFILL_GAP_RATIO * self._decode_step_ms / max(self._prefill_token_ms, 1e-6))
        return max(MIN_PREFILL_CHUNK, min(self.prefill_chunk, budget))

    def _note_timing(self, step: _Step, stage_ms: tuple[float, ...]) -> None:
        work_ms = sum(stage_ms)
        if step.prefill:
            self._prefill_token_ms = _average(self._prefill_token_ms, work_ms / step.fed)
        else:
            self._decode_step_ms = _average(self._decode_step_ms, work_ms)

    async def _launch(self, step: _Step) -> None:
        step_id = secrets.randbits(63)
        rows = tuple(Row(r.slot, r.kv_len, r.settings, sample) for r, sample in zip(step.requests, step.sample))
        tensor = torch.tensor([r.tokens[r.kv_len:r.kv_len + step.fed] for r in step.requests],
                              dtype=torch.int64)                          # (B, T)
        for request in step.requests:
            request.in_flight = True
        self._in_flight[step_id] = step
        self.metrics.step(len(rows))
        await self._send(Forward(step_id, rows, tensor))

    async def _send(self, message) -> None:
        try:
            await self.outbox.send(message)
        except ClusterError as exc:   # stage 0 unreachable: the liveness check names the engine
            logger.warning("data-plane send failed: %s", exc)

    def _step_done(self, message: Sampled) -> None:
        step = self._in_flight.pop(message.step_id, None)
        if step is None or len(message.token_ids) != len(step.requests):
            self.metrics.dropped()      # a step that ended, or an id nobody issued
            return
        self._note_timing(step, message.stage_ms)
        for request, sample, token_id in zip(step.requests, step.sample, message.token_ids):
            request.in_flight = False
            request.kv_len += step.fed
            if request.done:
                self._release(request)
                continue
            if sample:
                self._deliver(request, token_id, message.stage_ms)
            if request.preempting and not request.done:
                self._requeue(request)
        self._wake.set()

    def _deliver(self, request: _Request, token_id: int, stage_ms: tuple[float, ...]) -> None:
        request.generated.append(token_id)
        request.events.put_nowait((token_id, stage_ms))
        is_eos = token_id in self.eos_token_ids and not request.params.ignore_eos
        if is_eos or len(request.generated) >= request.params.max_new_tokens:
            request.done = True
            self._release(request)

    def _step_failed(self, message: Error) -> None:
        step = self._in_flight.pop(message.step_id, None)
        if step is None:
            self.metrics.dropped()
            return
        for request in step.requests:
            request.in_flight = False
            self._fail(request, ClusterError(f"generation failed: {message.message}"))
        self._wake.set()

    def _fail(self, request: _Request, error: BaseException) -> None:
        request.done = True
        request.events.put_nowait(error)
        if not request.in_flight:
            self._release(request)

    def _fail_all(self, error: BaseException) -> None:
        for request in [*self._running, *self._waiting]:
            self._fail(request, error)
        self._waiting.clear()

    # ----------------------------------------------------------------- receiving
    async def _receive_loop(self) -> None:
        while True:
            try:
                message = await self.inbox.recv()
            except FrameError as exc:  # malformed or forged: dropped and counted, never routed
                self.metrics.dropped()
                logger.warning("dropped a malformed data-plane message: %s", exc)
                continue
            if isinstance(message, Sampled):
                self._step_done(message)
            elif isinstance(message, Error):
                self._step_failed(message)
            elif isinstance(message, Free):
                event = self._freed.pop(message.message_id, None)
                if event is not None:
                    event.set()
            elif isinstance(message, Ping) and message.message_id in self._pings:
                self._pings.pop(message.message_id).set_result(True)
            else:
                self.metrics.dropped()

    async def ping(self, timeout_s: float = 5.0) -> bool:
        """True when a PING went through every stage and came back within timeout_s."""
        message_id = secrets.randbits(63)
        answered = self._pings[message_id] = asyncio.get_running_loop().create_future()
        try:
            await self._send(Ping(message_id))
            return await asyncio.wait_for(answered, timeout_s)
        except asyncio.TimeoutError:
            return False
        finally:
            self._pings.pop(message_id, None)

    def _check_stalled(self, waited_s: float) -> None:
        if self.suspended_since is not None:
            return                          # a failover is under way: the request waits in the queue
        if self.failure:
            raise ClusterError(self.failure)
        if any(task.done() for task in self._tasks):
            task = next(t for t in self._tasks if t.done())
            error = None if task.cancelled() else task.exception()
            self.lost(f"the coordinator's scheduler stopped ({error!r}); reload the model")
        problem = self.check_alive()
        if problem is None and waited_s >= self.step_timeout_s:
            problem = (f"no token arrived from the pipeline within {self.step_timeout_s:.0f} s although "
                       f"every engine is registered: a stage is hung")
        if problem:
            self.lost(problem)
        if self.failure:
            raise ClusterError(self.failure)

    def lost(self, problem: str) -> None:
        """The pipeline is lost: fail over when someone re-plans (``on_failure``), else end
        every request with ``problem``."""
        if self.suspended_since is not None or self.failure:
            return
        if self.on_failure is None:
            self.abort(ClusterError(problem))
            return
        self.suspend(problem)
        self.on_failure(problem)


def _empty_slots(count: int) -> collections.OrderedDict:
    return collections.OrderedDict((slot, (None, [])) for slot in range(count))


def _average(current: float | None, sample: float) -> float:
    return sample if current is None else (1 - _EMA) * current + _EMA * sample


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y or n >= limit:
            break
        n += 1
    return n


def _finish_reason(is_eos: bool, stopped: bool, step: int, params: SamplingParams) -> str | None:
    """"stop" (end of sequence or a stop string), "length" (max_new_tokens reached), or None."""
    if is_eos or stopped:
        return "stop"
    if step + 1 >= params.max_new_tokens:
        return "length"
    return None
