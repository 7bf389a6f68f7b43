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
import inspect
import logging
import time
import uuid
from contextlib import AsyncExitStack, aclosing

from tornado.iostream import StreamClosedError

from ..coordinator.tenants import Tenant
from ..errors import ClusterError, RequestError
from .base import JsonBodyHandler, dumps
from .choices import Choice, chat_logprobs, completion_logprobs
from .errors import bad_request
from .params import GenerationRequest, parse_chat_request, parse_completion_request
from .tenants import ISOLATION_HEADER, client_address, request_tenant, tenant_limits
from .tools import ReplyCalls

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

    def choice(self, choice: Choice, request: GenerationRequest) -> dict:
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
        reply = Reply(self.new_response_id(), int(time.time()), request.model,
                      len(request.prompt_ids), request.decoding.n, request.token_table)
        started = time.perf_counter()
        tenant = self.tenant(request)
        async with AsyncExitStack() as stack:
            streams = [await stack.enter_async_context(aclosing(events))
                       for events in await self.open_streams(request, tenant)]
            firsts = [await self.first_event(events, request) for events in streams]
            if request.stream:
                await self.stream(reply, request, firsts, streams)
            else:
                await self.complete(reply, request, firsts, streams)
        logger.info("%s %s: %d prompt + %d completion tokens, finish %s, %.2f s, client %s (%s)%s",
                    self.request.path, reply.response_id, reply.prompt_tokens, reply.completion_tokens,
                    reply.finish_reason, time.perf_counter() - started, tenant.label, self.request.remote_ip,
                    f", user {request.user!r}" if request.user else "")

    def new_response_id(self) -> str:
        """The reply's id, as OpenAI spells it: ``chatcmpl-<hex>``, ``cmpl-<hex>``."""
        return f"{self.id_prefix}-{uuid.uuid4().hex}"

    async def open_streams(self, request: GenerationRequest, tenant: Tenant) -> list:
        """One event stream per choice: ``astream`` for one, ``astream_n`` (one shared prefill) for
        more; each under its own copy of the grammar's processor."""
        ids, decoding = list(request.prompt_ids), request.decoding
        grammar = decoding.grammar
        if decoding.n == 1:
            extra = {} if grammar is None else {"processor": grammar.processor()}
            return [self.cluster.astream(ids, request.params, tenant, **extra)]
        extra = {} if grammar is None else {"processors": [grammar.processor() for _ in range(decoding.n)]}
        streams = self.cluster.astream_n(ids, request.params, decoding.n, tenant, **extra)
        return list(await streams if inspect.isawaitable(streams) else streams)

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

    async def complete(self, reply: Reply, request: GenerationRequest, firsts, streams) -> None:
        await together(self.drain(choice, first, events)
                       for choice, first, events in zip(reply.choices, firsts, streams))
        self.write_json({**reply.header(self.object_name),
                         "choices": [self.choice(choice, request) for choice in reply.choices],
                         "usage": reply.usage()})

    async def drain(self, choice: Choice, first, events) -> None:
        """Add every event of one choice's stream to ``choice``."""
        async for event in self.events_of(first, events):
            choice.add(event)

    async def events_of(self, first, events):
        """``first``, then the stream's events up to the one with a finish reason."""
        event = first
        yield event
        while event.finish_reason is None:
            try:
                event = await self.next_event(events)
            except StopAsyncIteration:
                return
            yield event

    async def stream(self, reply: Reply, request: GenerationRequest, firsts, streams) -> None:
        self.start_event_stream()
        extra = {"usage": None} if request.include_usage else {}

        async def send(choice: dict) -> None:
            await self.send_event({**reply.header(self.chunk_object_name), "choices": [choice], **extra})

        try:
            for choice in reply.choices:
                opening = self.opening_chunk(choice)
                if opening is not None:
                    await send(opening)
            async for choice, event in merged(self.events_of, reply.choices, firsts, streams):
                for chunk in self.chunks(choice, event, request):
                    await send(chunk)
        except (asyncio.CancelledError, StreamClosedError):
            raise
        except Exception as exc:
            await self.send_stream_error(exc)
            return
        if request.include_usage:
            await self.send_event({**reply.header(self.chunk_object_name), "choices": [], "usage": reply.usage()})
        await self.send_raw(b"data: [DONE]\n\n")
        self.finish()

    def start_event_stream(self) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")   # proxies must not hold the stream back

    def opening_chunk(self, choice: Choice) -> dict | None:
        return None

    def chunks(self, choice: Choice, event, request: GenerationRequest) -> list[dict]:
        """The chunk choices to send for ``event`` of ``choice`` (None: the stream ended without
        a finish reason), after adding it to ``choice``."""
        raise NotImplementedError

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
    """What a response accumulates: ids, counts, one Choice per choice."""

    def __init__(self, response_id: str, created: int, model: str, prompt_tokens: int, n: int = 1,
                 table=None):
        self.response_id = response_id
        self.created = created
        self.model = model
        self.prompt_tokens = prompt_tokens          # the prompt is prefilled once for all choices
        self.choices = [Choice(index, table) for index in range(n)]

    @property
    def completion_tokens(self) -> int:
        return sum(choice.completion_tokens for choice in self.choices)

    @property
    def finish_reason(self) -> str | None:
        return ",".join(str(choice.finish_reason) for choice in self.choices)

    def header(self, object_name: str) -> dict:
        return {"id": self.response_id, "object": object_name, "created": self.created, "model": self.model}

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


async def together(coroutines) -> list:
    """Run the coroutines at once; the first failure cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def merged(events_of, choices: list[Choice], firsts, streams):
    """(choice, event) pairs from every choice's stream as they come; (choice, None) when a stream
    ends without a finish reason. The first failure of any stream is raised."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice, first, events):
        try:
            async for event in events_of(first, events):
                await queue.put((choice, event, None))
                if event.finish_reason is not None:
                    return
            await queue.put((choice, None, None))
        except Exception as exc:
            await queue.put((choice, None, exc))

    tasks = [asyncio.ensure_future(pump(*args)) for args in zip(choices, firsts, streams)]
    try:
        for _ in choices:
            while True:
                choice, event, error = await queue.get()
                if error is not None:
                    raise error
                yield choice, event
                if event is None or event.finish_reason is not None:
                    break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ChatCompletionsHandler(GenerationHandler):
    """POST /v1/chat/completions."""

    id_prefix = "chatcmpl"
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    async def parse(self, body: dict) -> GenerationRequest:
        return await parse_chat_request(body, self.cluster, self.server.model_names,
                                        client=client_address(self.request.remote_ip))

    def choice(self, choice: Choice, request: GenerationRequest) -> dict:
        content, calls, finish_reason = chat_output(choice, request)
        message = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            message["tool_calls"] = calls
        return {"index": choice.index, "message": message, "logprobs": self.logprobs(choice.logprobs, request),
                "finish_reason": finish_reason}

    def opening_chunk(self, choice: Choice) -> dict:
        return self.chunk(choice, {"role": "assistant", "content": ""})

    def chunks(self, choice: Choice, event, request: GenerationRequest) -> list[dict]:
        ends = event is None or event.finish_reason is not None
        if request.decoding.calls_tools:        # content, or calls as they are written
            calls = reply_calls(choice)         # before adding the event: it reads the text so far
            if event is not None:
                choice.add(event)
            deltas = calls.deltas(event.text if event else "", (choice.finish_reason or "stop") if ends else None)
            chunks = [self.chunk(choice, delta) for delta in deltas]
            if ends:
                chunks.append(self.chunk(choice, {}, self.logprobs(choice.logprobs, request),
                                         chat_output(choice, request)[2]))
            return chunks
        if event is not None:
            choice.add(event)
        chunks = []
        logprobs = self.logprobs(event_logprobs(event), request)
        if event is not None and (event.text or logprobs):
            chunks.append(self.chunk(choice, {"content": event.text} if event.text else {}, logprobs))
        if ends:
            chunks.append(self.chunk(choice, {}, finish_reason=choice.finish_reason or "stop"))
        return chunks

    @staticmethod
    def chunk(choice: Choice, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None) -> dict:
        return {"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    @staticmethod
    def logprobs(entries, request: GenerationRequest) -> dict | None:
        if request.decoding.logprobs is None or not entries:
            return None
        return chat_logprobs(entries, request.token_table)


def chat_output(choice: Choice, request: GenerationRequest) -> tuple[str | None, list[dict], str]:
    """(content, tool calls, finish reason) of a finished chat choice (a tools request's through
    :meth:`ReplyCalls.output`)."""
    finish_reason = choice.finish_reason or "stop"
    if not request.decoding.calls_tools:
        return choice.text, [], finish_reason
    return reply_calls(choice).output(finish_reason)


def reply_calls(choice: Choice) -> ReplyCalls:
    """The choice's ReplyCalls: made once, from the text so far (all of it for a reply not streamed)."""
    if choice.calls is None:
        choice.calls = ReplyCalls(choice.text)
    return choice.calls


def event_logprobs(event) -> tuple:
    return (getattr(event, "logprobs", None) or ()) if event is not None else ()


class CompletionsHandler(GenerationHandler):
    """POST /v1/completions."""

    async def parse(self, body: dict) -> GenerationRequest:
        return await parse_completion_request(body, self.cluster, self.server.model_names,
                                              client=client_address(self.request.remote_ip))

    def choice(self, choice: Choice, request: GenerationRequest) -> dict:
        return {"index": choice.index, "text": choice.text, "logprobs": self.logprobs(choice.logprobs, request),
                "finish_reason": choice.finish_reason or "stop"}

    def chunks(self, choice: Choice, event, request: GenerationRequest) -> list[dict]:
        offset = choice.logprob_chars
        if event is not None:
            choice.add(event)
        finish_reason = choice.finish_reason or "stop" if event is None or event.finish_reason else None
        entries = event_logprobs(event)
        if event is not None and not event.text and not entries and finish_reason is None:
            return []
        return [{"index": choice.index, "text": event.text if event is not None else "",
                 "logprobs": self.logprobs(entries, request, offset), "finish_reason": finish_reason}]

    @staticmethod
    def logprobs(entries, request: GenerationRequest, offset: int = 0) -> dict | None:
        if request.decoding.logprobs is None:
            return None
        return completion_logprobs(entries or (), request.token_table, offset)
