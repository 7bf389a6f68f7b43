"""The step scheduler's runner: continuous batching over the pipeline, on the coordinator.

The policy (KV slots, tenants and fair share, preemption, chunked prefill, micro-batches, prefix
reuse, queue limits) is :mod:`~exo_lab.coordinator.schedule`'s :class:`SchedulingCore`, pure and
tested in one process. :class:`Scheduler` runs it: it owns the data-plane sockets (inbox,
outbox), the receive and step loops, each request's event queue, the metrics and the text
assembly. Each turn of the step loop asks the core for a plan, sends a FREE for each slot the plan
gives back and then its steps; each step that comes back goes to the core, and the tokens it
hands out go to their requests' streams.

- **Failover.** When a stage's engine is lost (gone from the controller, its process dead, or a
  step in flight past ``step_timeout_s``: hung), the scheduler suspends (:meth:`suspend`) and
  calls ``on_failure(reason)``: every running request goes back to the head of the queue with its
  KV forgotten and its tokens kept. The cluster re-plans on the survivors and rewires the
  scheduler to the new pipeline (:meth:`rewire`); each request then replays its prompt and the
  tokens generated so far as a prefill and goes on. Sampling draws depend only on (seed,
  position), so the tokens do not depend on whether a failure happened. Without ``on_failure``,
  or when the survivors cannot hold the model, every request ends with the error.
- **Re-balancing.** Every decode step's stage times go to :attr:`stage_clock`
  (:mod:`.balance`); when the supervisor moves layers it suspends the scheduler with
  ``why="rebalance"`` and rewires it as after a failover (counted as a re-balance, not a failover).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, NamedTuple

import torch

from ..errors import ClusterError, RequestError
from ..sampling import MAX_SEED, LogitProcessor, SamplingParams, StreamEvent, TokenLogprob
from ..wire import Copy, Error, Forward, FrameError, Free, Ping, Row, Sampled, Short
from .balance import StageClock
from .metrics import Metrics
from .schedule import PlannedStep, Request, SchedulingCore, Speculation, StepPlan, StepResult
from .tenants import LOCAL, Tenant
from .text import TextAssembler

if TYPE_CHECKING:
    from .draft_model import DraftModel

logger = logging.getLogger(__name__)

# How long a request may wait for its next token before the engines' liveness is checked.
STALL_CHECK_S = 0.5
POOLINGS = {"last": 1, "mean": 2}   # Cluster.embed's pooling -> wire.Row.embed
EMBED_PARAMS = SamplingParams(max_new_tokens=1)   # an embedding samples nothing


class _Token(NamedTuple):
    """A delivered token as its stream reads it."""

    token_id: int
    stage_ms: tuple[float, ...]
    logprob: TokenLogprob | None
    stopped: bool               # the request's processor finished with it


class Scheduler:
    """Owns the coordinator's data-plane sockets and every request in flight; the policy is its
    :class:`~exo_lab.coordinator.schedule.SchedulingCore`."""

    def __init__(self, *, inbox, outbox, tokenizer, eos_token_ids: set[int], context_length: int,
                 check_alive: Callable[[], str | None], max_batch: int = 1, micro_batches: int = 1,
                 prefill_chunk: int = 256, max_queued: int = 64, step_timeout_s: float = 60.0,
                 on_failure: Callable[[str], None] | None = None, speculation: Speculation = Speculation(),
                 draft_model: DraftModel | None = None, vocab_size: int | None = None):
        self.inbox = inbox
        self.outbox = outbox
        self.tokenizer = tokenizer
        self.check_alive = check_alive
        self.step_timeout_s = step_timeout_s
        self.on_failure = on_failure
        self.suspended_since: float | None = None      # a failover (or a re-balance) is under way since then
        self._suspended_for = "failover"               # ... for what (suspend's why)
        self.on_memory_short: Callable[[str], None] | None = None   # a stage refused a step (supervisor)
        self.metrics = Metrics(kv_slots=max_batch)
        self.stage_clock = StageClock()              # decode steps' stage times (re-balancing)
        self._decode_steps: dict[int, int] = {}      # step in flight of one token per row -> its rows
        self.failure: str | None = None
        self.training = None      # coordinator.finetune's sink for training messages, while a job runs
        self.core = SchedulingCore(max_batch=max_batch, context_length=context_length, eos_token_ids=eos_token_ids,
                                   micro_batches=micro_batches, prefill_chunk=prefill_chunk, max_queued=max_queued,
                                   speculation=speculation, vocab_size=vocab_size)
        self._events: dict[Request, asyncio.Queue] = {}   # _Tokens, a pooled vector, or an exception
        self._pooled: dict[Request, torch.Tensor] = {}      # embeddings: the chunks' vectors so far
        self._pings: dict[int, asyncio.Future] = {}
        self._freed: dict[int, asyncio.Event] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        # speculation "draft_model": the draft model, driven beside the core
        self.drafting = None
        if draft_model is not None:
            from .draft_model import Drafting

            self.drafting = Drafting(draft_model, self.core)

    # the core's settings, read and set here as before the core existed
    max_batch = property(lambda self: self.core.max_batch)
    context_length = property(lambda self: self.core.context_length)
    eos_token_ids = property(lambda self: set(self.core.eos_token_ids))
    prefill_chunk = property(lambda self: self.core.prefill_chunk,
                             lambda self, value: setattr(self.core, "prefill_chunk", max(1, value)))
    max_queued = property(lambda self: self.core.max_queued, lambda self, value: setattr(self.core, "max_queued", value))
    micro_batches = property(lambda self: self.core.micro_batches,
                             lambda self, value: setattr(self.core, "micro_batches", max(1, value)))

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._receive_loop()), asyncio.ensure_future(self._step_loop())]

    def suspend(self, reason: str, *, why: str = "failover") -> None:
        """Stop sending steps; put every running request back at the head of the queue with its
        KV forgotten (its prompt and generated tokens are replayed after :meth:`rewire`).
        ``why``: "failover" (a stage failed), "rebalance" (the layers move while every stage is
        up) or "memory" (a PC got short of memory: the stages shed KV slots)."""
        if self.suspended_since is not None:
            return
        if why == "failover":
            logger.warning("pipeline lost (%s): %d request(s) will be replayed", reason, len(self.core.running))
        else:
            logger.info("%s (%s): %d request(s) will be replayed",
                        "moving layers" if why == "rebalance" else "shedding KV slots", reason, len(self.core.running))
        self.suspended_since = time.perf_counter()
        self._suspended_for = why
        replayed = self.core.suspend()
        if why == "failover":
            self.metrics.failover(replayed)
        elif why == "rebalance":
            self.metrics.rebalanced()
        self._decode_steps.clear()
        if self.training is not None:
            self.training.lost(reason)
        if self.drafting is not None:
            self.drafting.stop()
        for event in self._freed.values():
            event.set()
        self._freed.clear()

    async def rewire(self, inbox, outbox, micro_batches: int | None = None, max_batch: int | None = None,
                     prefill_chunk: int | None = None) -> None:
        """Go on over a new pipeline (after :meth:`suspend`): its sockets (its number of
        micro-batches, of KV slots and its prefill chunk, when the memory watch changed them)
        replace the old ones, and the queued requests are admitted and replayed."""
        await self._stop_tasks()
        self.inbox, self.outbox = inbox, outbox
        if micro_batches is not None:
            self.micro_batches = micro_batches
        if prefill_chunk is not None:
            self.core.prefill_chunk = max(1, prefill_chunk)
        if max_batch is not None and max_batch != self.core.max_batch:
            self.core.resize(max_batch)
            self.metrics.shed(max_batch)
        self.failure = None
        self.stage_clock.reset()
        self.metrics.resumed(time.perf_counter() - self.suspended_since if self.suspended_since else 0.0,
                             why=self._suspended_for)
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
        if self.drafting is not None:
            self.drafting.close()
            self.drafting = None                # the draft model's weights and KV go with it

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
        return len(self.core.running) + len(self.core.waiting)

    # ----------------------------------------------------------------- requests
    def check_request(self, prompt_ids: list[int], params: SamplingParams, tenant: Tenant = LOCAL) -> None:
        """Raise RequestError when the request cannot run, QueueFull when it may not wait (before
        anything is sent), ClusterError when the cluster failed."""
        if self.failure:
            raise ClusterError(self.failure)
        self.core.check(prompt_ids, params, tenant)

    async def stream(self, prompt_ids: list[int], params: SamplingParams, tenant: Tenant = LOCAL,
                     processor: LogitProcessor | None = None) -> AsyncIterator[StreamEvent]:
        """Generate for one request of ``tenant``, yielding text deltas; the last event has
        finish_reason ("stop" also when ``processor`` finished). Raises RequestError, or
        QueueFull (past the queue caps), at the first event."""
        if self.failure:
            raise ClusterError(self.failure)
        # every step carries the same settings; an unseeded request gets its own random seed
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        request = Request(list(prompt_ids), params, params.settings(seed), tenant, processor)
        self.core.submit(request)         # admitted at once when a slot is free
        self._opened(request)
        async with contextlib.aclosing(self._follow(request, time.perf_counter())) as events:
            async for event in events:
                yield event

    def stream_group(self, prompt_ids: list[int], params: SamplingParams, n: int, tenant: Tenant = LOCAL,
                     processors: list[LogitProcessor] | None = None) -> list[AsyncIterator[StreamEvent]]:
        """``n`` choices of one prompt, prefilled once (its KV copied to the others' slots): a
        stream per choice, choice i seeded ``params.seed + i`` (mod 2**64) when seeded, else each
        its own random seed. Submitted at once (RequestError for n outside [1, max_batch] or a
        processors list not of n, QueueFull); close every stream to cancel its choice."""
        if self.failure:
            raise ClusterError(self.failure)
        if isinstance(n, bool) or not isinstance(n, int):
            raise RequestError(f"n must be an integer, got {n!r}", param="n")
        if processors is not None and len(processors) != n:
            raise RequestError(f"processors must be a list of n ({n}) processors", param="n")
        base = params.seed if params.seed is not None else None
        requests = [Request(list(prompt_ids), params,
                            params.settings(secrets.randbits(63) if base is None else (base + i) % (MAX_SEED + 1)),
                            tenant, processors[i] if processors is not None else None) for i in range(n)]
        self.core.submit_group(requests)
        started = time.perf_counter()
        for request in requests:
            self._opened(request)
        return [self._follow(request, started) for request in requests]

    async def embed(self, inputs: list[list[int]], pooling: str = "last", tenant: Tenant = LOCAL) -> list[torch.Tensor]:
        """One float32 vector (hidden,) per input (token ids): the model's final-norm hidden state
        of its last token ("last") or their mean ("mean"), not normalized. Prefill only, batched
        through the pipeline up to max_batch inputs at a time; no KV slot is kept. Raises
        RequestError for a bad pooling, an empty or over-long input, QueueFull past the caps."""
        if self.failure:
            raise ClusterError(self.failure)
        if pooling not in POOLINGS:
            raise RequestError(f"pooling must be one of {sorted(POOLINGS)}, got {pooling!r}", param="pooling")
        if not isinstance(inputs, (list, tuple)) or not inputs:
            raise RequestError("input must be a non-empty list of token id lists", param="input")
        prompts = [_token_ids(ids) for ids in inputs]
        for ids in prompts:
            self.core.check(ids, EMBED_PARAMS, tenant, embed=True)
        vectors = []
        for first in range(0, len(prompts), self.max_batch):
            vectors += await self._embed_wave(prompts[first:first + self.max_batch], POOLINGS[pooling], tenant)
        return vectors

    async def _embed_wave(self, prompts: list[list[int]], pooling: int, tenant: Tenant) -> list[torch.Tensor]:
        requests = [Request(ids, EMBED_PARAMS, EMBED_PARAMS.settings(0), tenant, embed=pooling) for ids in prompts]
        submitted = []
        try:
            for request in requests:
                self.core.submit(request)
                submitted.append(request)
                self._events[request] = asyncio.Queue()
            self._wake.set()
            return [await self._next_token(request) for request in requests]
        finally:
            for request in submitted:
                self._events.pop(request, None)
                self._pooled.pop(request, None)
                self.core.cancel(request)
            self._wake.set()

    def _opened(self, request: Request) -> None:
        self._events[request] = asyncio.Queue()
        self.metrics.request_started()
        self._wake.set()

    async def _follow(self, request: Request, started: float) -> AsyncIterator[StreamEvent]:
        """The stream of a submitted request: text deltas, then its end (finish_reason)."""
        params = request.params
        assembler = TextAssembler(self.tokenizer, params.stop)
        finish_reason = None
        try:
            for step in range(params.max_new_tokens):
                token = await self._next_token(request)
                if step == 0:
                    self.metrics.first_token(time.perf_counter() - started)
                self.metrics.token(token.stage_ms)
                is_eos = token.token_id in self.core.eos_token_ids and not params.ignore_eos
                delta = "" if is_eos else assembler.add(token.token_id)
                ids = [] if is_eos else [token.token_id]
                logprobs = (token.logprob,) if ids and token.logprob is not None else ()
                finish_reason = _finish_reason(is_eos, assembler.stopped or token.stopped, step, params)
                if finish_reason is not None:
                    if not assembler.stopped:
                        delta += assembler.flush()   # nothing can complete a stop string any more
                    yield StreamEvent(delta, ids, finish_reason, logprobs)
                    return
                yield StreamEvent(delta, ids, logprobs=logprobs)
        except BaseException as exc:
            if not isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
                self.metrics.error()
            raise
        finally:
            self.metrics.request_finished(finish_reason, time.perf_counter() - started)
            self._events.pop(request, None)
            self.core.cancel(request)       # its slot comes back now or when its step returns
            self._wake.set()

    async def _next_token(self, request: Request):
        waited = 0.0
        events = self._events[request]
        while True:
            try:
                event = await asyncio.wait_for(events.get(), STALL_CHECK_S)
            except asyncio.TimeoutError:
                waited = waited + STALL_CHECK_S if request.in_flight else 0.0
                self._check_stalled(waited)
                continue
            if isinstance(event, BaseException):
                raise event
            return event

    def _tell(self, request: Request, event) -> None:
        """Hand ``event`` (a token and its stage ms, or an exception) to the request's stream."""
        events = self._events.get(request)
        if events is not None:
            events.put_nowait(event)

    def _fail_all(self, error: BaseException) -> None:
        for request in self.core.abort():
            self._tell(request, error)
        self._send_frees(self.core.take_freed())

    # ----------------------------------------------------------------- steps
    async def _step_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.suspended_since is not None:
                continue
            if self.drafting is not None:
                await self.drafting.before_plan()
                self.metrics.draft_seconds_total = self.drafting.model.seconds
                if self.suspended_since is not None:
                    continue
            plan = self.core.schedule()
            self._note_plan(plan)
            self._send_frees(plan.free_slots)
            for request, why in plan.failed:
                self._tell(request, ClusterError(f"generation failed: {why}"))
            for src_slot, dst_slot, length in plan.copies:   # awaited: before the steps that read them
                await self._send(Copy(secrets.randbits(63), src_slot, dst_slot, length))
            for step in plan.steps:
                if self.suspended_since is not None:
                    break                   # the core forgot these steps with the pipeline
                await self._launch(step)
                if self.drafting is not None:
                    self.drafting.launched(step)

    def _note_plan(self, plan: StepPlan) -> None:
        """The plan's admissions, preemptions and the load, into the metrics."""
        for positions in plan.reused_positions:
            self.metrics.prefix_hit(positions)
        for _ in range(plan.preempted):
            self.metrics.preempted()
        self.metrics.set_load(len(self.core.running), len(self.core.waiting), self.core.client_load())

    async def _launch(self, step: PlannedStep) -> None:
        rows = tuple(Row(row.slot, row.position, row.settings, row.sample, row.rule, row.logprobs, row.embed,
                         row.verify, row.adapter) for row in step.rows)
        tensor = torch.tensor([row.token_ids for row in step.rows], dtype=torch.int64)   # (B, T)
        self.metrics.step(len(rows))
        if tensor.shape[1] == 1 and not any(row.embed for row in rows):
            self._decode_steps[step.step_id] = len(rows)
        await self._send(Forward(step.step_id, rows, tensor))

    def _send_frees(self, slots: tuple[int, ...]) -> None:
        """A FREE down the pipe for each slot, its return awaited by :meth:`close`."""
        for slot in slots:
            message_id = secrets.randbits(63)
            self._freed[message_id] = asyncio.Event()
            asyncio.ensure_future(self._send(Free(message_id, slot)))

    async def _send(self, message) -> None:
        try:
            await self.outbox.send(message)
        except ClusterError as exc:   # stage 0 unreachable: the liveness check names the engine
            logger.warning("data-plane send failed: %s", exc)

    def _step_done(self, message: Sampled) -> None:
        if self.drafting is not None:
            self.drafting.landed(message.step_id)
        rows = self._decode_steps.pop(message.step_id, None)
        if rows is not None:
            self.stage_clock.record(message.stage_ms, rows)
        delivery = self.core.apply(StepResult(message.step_id, tuple(message.token_ids), tuple(message.stage_ms),
                                              tuple(message.logprobs), message.vectors, tuple(message.verified)))
        if delivery.dropped:
            self.metrics.dropped()      # a step that ended, or an id nobody issued
            return
        if delivery.drafted:
            self.metrics.speculated(delivery.drafted, delivery.accepted, delivery.verified_rows)
        timed = set()         # a verify row's several tokens: the step's timings count once per row
        for (request, token_id), logprob in zip(delivery.tokens, delivery.logprobs):
            stage_ms = () if request in timed else message.stage_ms
            timed.add(request)
            self._tell(request, _Token(token_id, stage_ms, logprob, request.stopped and request.done))
        for request, vector in delivery.vectors:
            self._pool(request, vector)
        for request in delivery.finished:
            if request.embed and request in self._pooled:
                pooled = self._pooled.pop(request)
                self._tell(request, pooled / len(request.prompt) if request.embed == POOLINGS["mean"] else pooled)
        for request, why in delivery.failed:
            self._tell(request, ClusterError(f"generation failed: {why}"))
        self._wake.set()

    def _pool(self, request: Request, vector) -> None:
        """Add an embedding chunk's vector (the sum of its positions, or its last position)."""
        if vector is None:
            self._tell(request, ClusterError("the last stage returned no vector for an embedding"))
            return
        previous = self._pooled.get(request)
        last = request.embed == POOLINGS["last"]
        self._pooled[request] = vector.clone() if previous is None or last else previous + vector

    def _short_of_memory(self, message: Short) -> None:
        """A stage refused a step: its PC is short of memory. With a supervisor, every request
        goes back to the queue (nothing is lost) while it sheds KV slots; without one, the
        step's requests fail with the reason."""
        self.metrics.memory_short()
        reason = (f"stage {message.stage}'s PC is short of memory ({message.free_bytes / 2**20:.0f} MiB free, "
                  f"a step needed {message.needed_bytes / 2**20:.0f} MiB)")
        if self.suspended_since is not None:
            return                          # the supervisor is already at it
        if self.on_memory_short is None:
            self._step_failed(Error(message.step_id, reason))
            return
        self.suspend(reason, why="memory")
        self.on_memory_short(reason)

    def _step_failed(self, message: Error) -> None:
        self._decode_steps.pop(message.step_id, None)
        if self.drafting is not None:
            self.drafting.landed(message.step_id)
        failed = self.core.fail_step(message.step_id)
        if failed is None:
            self.metrics.dropped()
            return
        for request in failed:
            self._tell(request, ClusterError(f"generation failed: {message.message}"))
        self._wake.set()

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
            elif self.training is not None and self.training.owns(message):
                self.training.received(message)
            elif isinstance(message, Error):
                self._step_failed(message)
            elif isinstance(message, Short):
                self._short_of_memory(message)
            elif isinstance(message, Free):
                event = self._freed.pop(message.message_id, None)
                if event is not None:
                    event.set()
            elif isinstance(message, Ping) and message.message_id in self._pings:
                self._pings.pop(message.message_id).set_result(True)
            elif isinstance(message, Copy):
                pass                    # went round the ring: every stage copied
            else:
                self.metrics.dropped()

    async def send_training(self, message) -> None:
        """Send a fine-tuning message to stage 0 (coordinator.finetune). Raises ClusterError when
        stage 0 cannot be reached."""
        await self.outbox.send(message)

    async def ping(self, timeout_s: float = 5.0) -> bool:
        """True when a PING went through every stage and came back within timeout_s; False too
        when the pipeline was rewired under it (its socket closed: a memory shed or a failover),
        rather than the CancelledError the closed socket's send raises."""
        message_id = secrets.randbits(63)
        answered = self._pings[message_id] = asyncio.get_running_loop().create_future()
        try:
            await self._send(Ping(message_id))
            return await asyncio.wait_for(answered, timeout_s)
        except asyncio.TimeoutError:
            return False
        except asyncio.CancelledError:
            cancelling = getattr(asyncio.current_task(), "cancelling", None)   # Python 3.11+
            if cancelling is None or cancelling():
                raise                       # this ping itself was cancelled: pass it on
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


def _token_ids(ids) -> list[int]:
    if not isinstance(ids, (list, tuple)) or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
        raise RequestError("each input must be a list of token ids (integers >= 0)", param="input")
    return list(ids)


def _finish_reason(is_eos: bool, stopped: bool, step: int, params: SamplingParams) -> str | None:
    """"stop" (end of sequence or a stop string), "length" (max_new_tokens reached), or None."""
    if is_eos or stopped:
        return "stop"
    if step + 1 >= params.max_new_tokens:
        return "length"
    return None
