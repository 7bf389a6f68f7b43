"""POST /v1/chat/completions and /v1/completions: one generation per request, streamed or not.

A request runs in its own task so that a client who hangs up cancels it at once
(:meth:`GenerationHandler.on_connection_close`); the scheduler then sends FREE down the pipe and
every stage drops the request's KV cache. The cancel always wins: ``asyncio.wait_for`` (Python
< 3.12) can swallow a cancel that races the result it waits for, so every event is also checked
against the handler's own abort flag (:meth:`GenerationHandler.next_event`).

When the server stops (``ApiServer.astop``, SIGTERM of ``exo-lab serve``) every generation in
flight ends cleanly: a stream with an error event and ``[DONE]``, a whole completion with a 503.

Each request runs as its client's tenant (:mod:`exo_lab.api.tenants`: the TCP peer's address and
the accepted API key, narrowed by ``user`` and ``X-Exo-Lab-Isolation`` for prefix reuse), under
the config's ``api.max_running_per_client`` and ``api.max_queued_per_client``; past them the
scheduler's QueueFull is a 429 naming the client's own limit, with Retry-After.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import aclosing

from tornado.iostream import StreamClosedError

from ..coordinator.tenants import Tenant
from ..errors import ClusterError, RequestError
from .base import JsonBodyHandler, dumps
from .errors import bad_request
from .params import GenerationRequest, parse_chat_request, parse_completion_request
from .tenants import ISOLATION_HEADER, client_address, request_tenant, tenant_limits

logger = logging.getLogger(__name__)


class GenerationHandler(JsonBodyHandler):
    """The shared flow; subclasses say how the request is parsed and how choices look."""

    id_prefix = "cmpl"
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def initialize(self, server) -> None:
        super().initialize(server)
        self._task: asyncio.Task | None = None
        self._abort: str | None = None       # why generation must end now: "client gone" | "shutdown"
        self._ended = asyncio.Event()

    async def parse(self, body: dict) -> GenerationRequest:
        raise NotImplementedError

    def choice(self, text: str, finish_reason: str | None) -> dict:
        raise NotImplementedError

    def chunk_choice(self, text: str | None, finish_reason: str | None) -> dict:
        raise NotImplementedError

    # ------------------------------------------------------------------ flow
    async def handle(self, body: dict) -> None:
        self.server.generations.add(self)
        try:
            request = await self.parse(body)
            if self._abort is None:
                self._task = asyncio.ensure_future(self.respond(request))
                await self._run(self._task)
            if self._abort == "shutdown":
                await self.end_for_shutdown()
        finally:
            self.server.generations.discard(self)
            self._ended.set()

    async def _run(self, task: asyncio.Task) -> None:
        try:
            await task
        except StreamClosedError:
            pass  # a write found the connection closed; the task has ended and closed its stream
        except asyncio.CancelledError:
            if self._abort is None:
                raise
        else:
            return
        if self._abort != "shutdown":
            logger.info("%s: the client disconnected; generation cancelled", self.request.path)

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self.abort("client gone")

    def abort(self, reason: str) -> None:
        """End the generation now (the first reason given wins)."""
        self._abort = self._abort or reason
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def shut_down(self) -> None:
        """The server stops: end this generation (see the module docstring) and wait until done."""
        self.abort("shutdown")
        await self._ended.wait()

    async def end_for_shutdown(self) -> None:
        error = ClusterError("the server is shutting down; retry on its replacement")
        if not self._headers_written:
            raise error                    # a plain 503
        if not self._finished and not self.request.connection.stream.closed():
            await self.send_stream_error(error)
            await self.send_raw(b"data: [DONE]\n\n")
            self.finish()

    async def next_event(self, events):
        """The next event, unless the generation was aborted meanwhile."""
        event = await anext(events)
        if self._abort is not None:
            raise asyncio.CancelledError()   # a cancel that raced this event was swallowed
        return event

    async def respond(self, request: GenerationRequest) -> None:
        reply = Reply(f"{self.id_prefix}-{uuid.uuid4().hex}", int(time.time()), request.model,
                      len(request.prompt_ids))
        started = time.perf_counter()
        tenant = self.tenant(request)
        async with aclosing(self.cluster.astream(list(request.prompt_ids), request.params, tenant)) as events:
            first = await self.first_event(events, request)
            if request.stream:
                await self.stream(reply, request, first, events)
            else:
                await self.complete(reply, first, events)
        logger.info("%s %s: %d prompt + %d completion tokens, finish %s, %.2f s, client %s (%s)%s",
                    self.request.path, reply.response_id, reply.prompt_tokens, reply.completion_tokens,
                    reply.finish_reason, time.perf_counter() - started, tenant.label, self.request.remote_ip,
                    f", user {request.user!r}" if request.user else "")

    def tenant(self, request: GenerationRequest) -> Tenant:
        """Who asks: the TCP peer (``remote_ip``: tornado is not told to trust forwarding headers)
        with the key it passed, under the config's per-client caps."""
        return request_tenant(self.request.remote_ip, self.server.api_key, request.user,
                              self.request.headers.get(ISOLATION_HEADER), tenant_limits(self.cluster.config))

    async def first_event(self, events, request: GenerationRequest):
        """The first event, awaited before any header is sent so refusals keep their status."""
        try:
            return await self.next_event(events)
        except RequestError as exc:
            needed = len(request.prompt_ids) + request.params.max_new_tokens
            code = "context_length_exceeded" if needed > self.cluster.context_length else None
            raise bad_request(str(exc), param=exc.param, code=code) from None

    async def complete(self, reply: "Reply", first, events) -> None:
        texts = [reply.add(first)]
        event = first
        while event.finish_reason is None:
            try:
                event = await self.next_event(events)
            except StopAsyncIteration:
                break
            texts.append(reply.add(event))
        self.write_json({**reply.header(self.object_name),
                         "choices": [self.choice("".join(texts), reply.finish_reason)],
                         "usage": reply.usage()})

    async def stream(self, reply: "Reply", request: GenerationRequest, first, events) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")   # proxies must not hold the stream back
        extra = {"usage": None} if request.include_usage else {}

        async def send(choice: dict) -> None:
            await self.send_event({**reply.header(self.chunk_object_name), "choices": [choice], **extra})

        try:
            opening = self.chunk_choice(None, None)
            if opening is not None:
                await send(opening)
            await self.stream_events(reply, send, first, events)
        except (asyncio.CancelledError, StreamClosedError):
            raise
        except Exception as exc:
            await self.send_stream_error(exc)
            return
        if request.include_usage:
            await self.send_event({**reply.header(self.chunk_object_name), "choices": [], "usage": reply.usage()})
        await self.send_raw(b"data: [DONE]\n\n")
        self.finish()

    async def stream_events(self, reply: "Reply", send, first, events) -> None:
        event = first
        while True:
            text = reply.add(event)
            if text:
                await send(self.chunk_choice(text, None))
            if event.finish_reason is not None:
                await send(self.chunk_choice("", event.finish_reason))
                return
            event = await self.next_event(events)

    async def send_stream_error(self, exc: Exception) -> None:
        """After the headers are out, an error can only travel as an event (then the stream ends)."""
        self.log_exception(type(exc), exc, exc.__traceback__)
        await self.send_event(self.client_error(exc).body())

    async def send_event(self, payload: dict) -> None:
        await self.send_raw(b"data: " + dumps(payload) + b"\n\n")

    async def send_raw(self, data: bytes) -> None:
        self.write(data)
        await self.flush()


class Reply:
    """What a response accumulates: ids, counts, the finish reason."""

    def __init__(self, response_id: str, created: int, model: str, prompt_tokens: int):
        self.response_id = response_id
        self.created = created
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    def add(self, event) -> str:
        self.completion_tokens += len(event.token_ids)
        self.finish_reason = event.finish_reason or self.finish_reason
        return event.text

    def header(self, object_name: str) -> dict:
        return {"id": self.response_id, "object": object_name, "created": self.created, "model": self.model}

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class ChatCompletionsHandler(GenerationHandler):
    """POST /v1/chat/completions."""

    id_prefix = "chatcmpl"
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    async def parse(self, body: dict) -> GenerationRequest:
        return await parse_chat_request(body, self.cluster, self.server.model_names,
                                        client=client_address(self.request.remote_ip))

    def choice(self, text: str, finish_reason: str | None) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}

    def chunk_choice(self, text: str | None, finish_reason: str | None) -> dict:
        # text None: the opening chunk, which carries the role; "" with a reason: the closing one.
        if text is None:
            delta = {"role": "assistant", "content": ""}
        else:
            delta = {"content": text} if text else {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


class CompletionsHandler(GenerationHandler):
    """POST /v1/completions."""

    async def parse(self, body: dict) -> GenerationRequest:
        return await parse_completion_request(body, self.cluster, self.server.model_names,
                                              client=client_address(self.request.remote_ip))

    def choice(self, text: str, finish_reason: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def chunk_choice(self, text: str | None, finish_reason: str | None) -> dict | None:
        if text is None:
            return None     # completions streams have no opening chunk
        return self.choice(text, finish_reason)
