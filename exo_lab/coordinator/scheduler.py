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
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable

import torch

from ..errors import ClusterError
from ..sampling import SamplingParams, StreamEvent
from ..wire import Error, Forward, FrameError, Free, Ping, Row, Sampled
from .metrics import Metrics
from .schedule import PlannedStep, Request, SchedulingCore, StepPlan, StepResult
from .tenants import LOCAL, Tenant
from .text import TextAssembler

logger = logging.getLogger(__name__)

# How long a request may wait for its next token before the engines' liveness is checked.
STALL_CHECK_S = 0.5


class Scheduler:
    """Owns the coordinator's data-plane sockets and every request in flight; the policy is its
    :class:`~exo_lab.coordinator.schedule.SchedulingCore`."""

    def __init__(self, *, inbox, outbox, tokenizer, eos_token_ids: set[int], context_length: int,
                 check_alive: Callable[[], str | None], max_batch: int = 1, micro_batches: int = 1,
                 prefill_chunk: int = 256, max_queued: int = 64, step_timeout_s: float = 60.0,
                 on_failure: Callable[[str], None] | None = None):
        self.inbox = inbox
        self.outbox = outbox
        self.tokenizer = tokenizer
        self.check_alive = check_alive
        self.step_timeout_s = step_timeout_s
        self.on_failure = on_failure
        self.suspended_since: float | None = None      # a failover is under way since then
        self.metrics = Metrics(kv_slots=max_batch)
        self.failure: str | None = None
        self.core = SchedulingCore(max_batch=max_batch, context_length=context_length, eos_token_ids=eos_token_ids,
                                   micro_batches=micro_batches, prefill_chunk=prefill_chunk, max_queued=max_queued)
        self._events: dict[Request, asyncio.Queue] = {}   # token ids and their stage ms, or an exception
        self._pings: dict[int, asyncio.Future] = {}
        self._freed: dict[int, asyncio.Event] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    # the core's settings, read and set here as before the core existed
    max_batch = property(lambda self: self.core.max_batch)
    context_length = property(lambda self: self.core.context_length)
    eos_token_ids = property(lambda self: set(self.core.eos_token_ids))
    prefill_chunk = property(lambda self: self.core.prefill_chunk)
    max_queued = property(lambda self: self.core.max_queued, lambda self, value: setattr(self.core, "max_queued", value))
    micro_batches = property(lambda self: self.core.micro_batches,
                             lambda self, value: setattr(self.core, "micro_batches", max(1, value)))

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._receive_loop()), asyncio.ensure_future(self._step_loop())]

    def suspend(self, reason: str) -> None:
        """Stop sending steps; put every running request back at the head of the queue with its
        KV forgotten (its prompt and generated tokens are replayed after :meth:`rewire`)."""
        if self.suspended_since is not None:
            return
        logger.warning("pipeline lost (%s): %d request(s) will be replayed", reason, len(self.core.running))
        self.suspended_since = time.perf_counter()
        self.metrics.failover(self.core.suspend())
        for event in self._freed.values():
            event.set()
        self._freed.clear()

    async def rewire(self, inbox, outbox, micro_batches: int | None = None) -> None:
        """Go on over a new pipeline (after :meth:`suspend`): its sockets (and its number of
        micro-batches) replace the old ones, and the queued requests are admitted and replayed."""
        await self._stop_tasks()
        self.inbox, self.outbox = inbox, outbox
        if micro_batches is not None:
            self.micro_batches = micro_batches
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
        return len(self.core.running) + len(self.core.waiting)

    # ----------------------------------------------------------------- requests
    def check_request(self, prompt_ids: list[int], params: SamplingParams, tenant: Tenant = LOCAL) -> None:
        """Raise RequestError when the request cannot run, QueueFull when it may not wait (before
        anything is sent), ClusterError when the cluster failed."""
        if self.failure:
            raise ClusterError(self.failure)
        self.core.check(prompt_ids, params, tenant)

    async def stream(self, prompt_ids: list[int], params: SamplingParams,
                     tenant: Tenant = LOCAL) -> AsyncIterator[StreamEvent]:
        """Generate for one request of ``tenant``, yielding text deltas; the last event has
        finish_reason. Raises RequestError, or QueueFull (past the queue caps), at the first event."""
        if self.failure:
            raise ClusterError(self.failure)
        # every step carries the same settings; an unseeded request gets its own random seed
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        request = Request(list(prompt_ids), params, params.settings(seed), tenant)
        started = time.perf_counter()
        assembler = TextAssembler(self.tokenizer, params.stop)
        self.core.submit(request)         # admitted at once when a slot is free
        self._events[request] = asyncio.Queue()
        self.metrics.request_started()
        self._wake.set()
        finish_reason = None
        try:
            for step in range(params.max_new_tokens):
                token_id, stage_ms = await self._next_token(request)
                if step == 0:
                    self.metrics.first_token(time.perf_counter() - started)
                self.metrics.token(stage_ms)
                is_eos = token_id in self.core.eos_token_ids and not params.ignore_eos
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
            self._events.pop(request, None)
            self.core.cancel(request)       # its slot comes back now or when its step returns
            self._wake.set()

    async def _next_token(self, request: Request) -> tuple[int, tuple[float, ...]]:
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
            plan = self.core.schedule()
            self._note_plan(plan)
            self._send_frees(plan.free_slots)
            for step in plan.steps:
                if self.suspended_since is not None:
                    break                   # the core forgot these steps with the pipeline
                await self._launch(step)

    def _note_plan(self, plan: StepPlan) -> None:
        """The plan's admissions, preemptions and the load, into the metrics."""
        for positions in plan.reused_positions:
            self.metrics.prefix_hit(positions)
        for _ in range(plan.preempted):
            self.metrics.preempted()
        self.metrics.set_load(len(self.core.running), len(self.core.waiting), self.core.client_load())

    async def _launch(self, step: PlannedStep) -> None:
        rows = tuple(Row(row.slot, row.position, row.settings, row.sample) for row in step.rows)
        tensor = torch.tensor([row.token_ids for row in step.rows], dtype=torch.int64)   # (B, T)
        self.metrics.step(len(rows))
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
        delivery = self.core.apply(StepResult(message.step_id, tuple(message.token_ids), tuple(message.stage_ms)))
        if delivery.dropped:
            self.metrics.dropped()      # a step that ended, or an id nobody issued
            return
        for request, token_id in delivery.tokens:
            self._tell(request, (token_id, message.stage_ms))
        self._wake.set()

    def _step_failed(self, message: Error) -> None:
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


def _finish_reason(is_eos: bool, stopped: bool, step: int, params: SamplingParams) -> str | None:
    """"stop" (end of sequence or a stop string), "length" (max_new_tokens reached), or None."""
    if is_eos or stopped:
        return "stop"
    if step + 1 >= params.max_new_tokens:
        return "length"
    return None
