"""The coordinator side of the data plane: requests, stop conditions, streaming, cancellation.

A :class:`Scheduler` lives on one asyncio loop (the cluster's loop thread). Each request sends
its prompt to stage 0, then one token per step; the last stage samples and only the token id
comes back. Several requests interleave through the pipeline, each with its own KV cache on
every stage. However a request ends (finished, error, client gone, task cancelled) a FREE
message follows it down the pipe, so every stage drops its cache.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from ..errors import ClusterError, RequestError
from ..sampling import SamplingParams, SamplingSettings, StreamEvent
from ..wire import Error, Forward, FrameError, Free, Ping, Token
from .metrics import Metrics
from .text import TextAssembler

logger = logging.getLogger(__name__)

# How long a step may wait for its token before the engines' liveness is checked.
STALL_CHECK_S = 0.5


@dataclass
class _Request:
    request_id: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)   # Token | Error | Ping | an exception


class Scheduler:
    """Owns the coordinator's data-plane sockets and every request in flight."""

    def __init__(self, *, inbox, outbox, tokenizer, eos_token_ids: set[int], context_length: int,
                 check_alive: Callable[[], str | None], step_timeout_s: float = 300.0):
        self.inbox = inbox
        self.outbox = outbox
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.context_length = context_length
        self.check_alive = check_alive
        self.step_timeout_s = step_timeout_s
        self.metrics = Metrics()
        self.failure: str | None = None
        self._requests: dict[int, _Request] = {}
        self._receiver: asyncio.Task | None = None
        self._freed: dict[int, asyncio.Event] = {}

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._receiver = asyncio.ensure_future(self._receive_loop())

    async def close(self) -> None:
        # let the FREEs already on their way come back, so no stage blocks sending to a closed inbox
        waits = [asyncio.ensure_future(event.wait()) for event in self._freed.values()]
        if waits:
            await asyncio.wait(waits, timeout=2.0)
            for wait in waits:
                wait.cancel()
        if self._receiver is not None:
            self._receiver.cancel()
            try:
                await self._receiver
            except asyncio.CancelledError:
                pass
        for request in self._requests.values():
            request.queue.put_nowait(ClusterError("the cluster is shutting down"))
        self.inbox.close()
        self.outbox.close()

    @property
    def active_requests(self) -> int:
        return len(self._requests)

    async def _receive_loop(self) -> None:
        while True:
            try:
                message = await self.inbox.recv()
            except FrameError as exc:  # malformed or forged: dropped and counted, never routed
                self.metrics.dropped()
                logger.warning("dropped a malformed data-plane message: %s", exc)
                continue
            if isinstance(message, Free):
                event = self._freed.pop(message.request_id, None)
                if event is not None:
                    event.set()
                continue
            request = self._requests.get(message.request_id)
            if request is None:
                self.metrics.dropped()    # a request that ended, or an id nobody issued
                continue
            request.queue.put_nowait(message)

    def _new_request(self) -> _Request:
        """A request with an id nobody can guess (63 random bits), registered for replies."""
        while (request_id := secrets.randbits(63)) in self._requests or request_id in self._freed:
            pass
        request = self._requests[request_id] = _Request(request_id)
        return request

    # ----------------------------------------------------------------- requests
    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError when the request cannot run (before anything is sent)."""
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

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[StreamEvent]:
        """Generate for one request, yielding text deltas; the last event has finish_reason."""
        self.check_request(prompt_ids, params)
        request = self._new_request()
        # every step carries the same settings; an unseeded request gets its own random seed
        settings = params.settings(params.seed if params.seed is not None else secrets.randbits(63))
        started = time.perf_counter()
        assembler = TextAssembler(self.tokenizer, params.stop)
        self.metrics.request_started()
        finish_reason = None
        try:
            await self._send_forward(request.request_id, prompt_ids, 0, settings)
            position = len(prompt_ids)
            for step in range(params.max_new_tokens):
                token = await self._next_token(request)
                if step == 0:
                    self.metrics.first_token(time.perf_counter() - started)
                self.metrics.token(token.stage_ms)
                is_eos = token.token_id in self.eos_token_ids and not params.ignore_eos
                delta = "" if is_eos else assembler.add(token.token_id)
                finish_reason = _finish_reason(is_eos, assembler.stopped, step, params)
                if finish_reason is not None:
                    if not assembler.stopped:
                        delta += assembler.flush()   # nothing can complete a stop string any more
                    yield StreamEvent(delta, [] if is_eos else [token.token_id], finish_reason)
                    return
                yield StreamEvent(delta, [token.token_id])
                await self._send_forward(request.request_id, [token.token_id], position, settings)
                position += 1
        except BaseException as exc:
            if not isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
                self.metrics.error()
            raise
        finally:
            self.metrics.request_finished(finish_reason, time.perf_counter() - started)
            self._requests.pop(request.request_id, None)
            self._send_free(request.request_id)

    async def _send_forward(self, request_id: int, token_ids: list[int], position: int,
                            settings: SamplingSettings) -> None:
        tensor = torch.tensor([token_ids], dtype=torch.int64)  # (1, T)
        await self.outbox.send(Forward(request_id, position, tensor, settings))

    def _send_free(self, request_id: int) -> None:
        self._freed[request_id] = asyncio.Event()
        asyncio.ensure_future(self.outbox.send(Free(request_id)))

    async def ping(self, timeout_s: float = 5.0) -> bool:
        """True when a PING went through every stage and came back within timeout_s."""
        request = self._new_request()
        try:
            await self.outbox.send(Ping(request.request_id))
            message = await asyncio.wait_for(request.queue.get(), timeout_s)
            return isinstance(message, Ping)
        except (asyncio.TimeoutError, ClusterError):
            return False
        finally:
            self._requests.pop(request.request_id, None)

    async def _next_token(self, request: _Request) -> Token:
        waited = 0.0
        while True:
            try:
                message = await asyncio.wait_for(request.queue.get(), STALL_CHECK_S)
            except asyncio.TimeoutError:
                waited += STALL_CHECK_S
                self._check_stalled(waited)
                continue
            if isinstance(message, BaseException):
                raise message
            if isinstance(message, Error):
                raise ClusterError(f"generation failed: {message.message}")
            if isinstance(message, Token):
                return message

    def _check_stalled(self, waited_s: float) -> None:
        if self._receiver is not None and self._receiver.done():
            error = None if self._receiver.cancelled() else self._receiver.exception()
            self.failure = f"the coordinator stopped receiving from the pipeline ({error!r}); reload the model"
            raise ClusterError(self.failure)
        problem = self.check_alive()
        if problem:
            self.failure = problem
            raise ClusterError(problem)
        if waited_s >= self.step_timeout_s:
            raise ClusterError(
                f"no token arrived from the pipeline within {self.step_timeout_s:.0f} s although every "
                f"engine is alive; a stage may be stuck. Check `cluster.status()` and reload the model")


def _finish_reason(is_eos: bool, stopped: bool, step: int, params: SamplingParams) -> str | None:
    """"stop" (end of sequence or a stop string), "length" (max_new_tokens reached), or None."""
    if is_eos or stopped:
        return "stop"
    if step + 1 >= params.max_new_tokens:
        return "length"
    return None
