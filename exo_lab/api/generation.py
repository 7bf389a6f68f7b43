"""POST /v1/chat/completions and /v1/completions: one generation per request, streamed or not.

A request runs in its own task so that a client who hangs up cancels it at once
(:meth:`GenerationHandler.on_connection_close`); the scheduler then sends FREE down the pipe and
every stage drops the request's KV cache.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import aclosing

from tornado.iostream import StreamClosedError

from ..errors import RequestError
from .base import JsonBodyHandler, dumps
from .errors import api_error_from, bad_request
from .params import GenerationRequest, parse_chat_request, parse_completion_request

logger = logging.getLogger(__name__)


class GenerationHandler(JsonBodyHandler):
    """The shared flow; subclasses say how the request is parsed and how choices look."""

    id_prefix = "cmpl"
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def initialize(self, server) -> None:
        super().initialize(server)
        self._task: asyncio.Task | None = None
        self._client_gone = False

    def parse(self, body: dict) -> GenerationRequest:
        raise NotImplementedError

    def choice(self, text: str, finish_reason: str | None) -> dict:
        raise NotImplementedError

    def chunk_choice(self, text: str | None, finish_reason: str | None) -> dict:
        raise NotImplementedError

    # ------------------------------------------------------------------ flow
    async def handle(self, body: dict) -> None:
        request = self.parse(body)
        self._task = asyncio.ensure_future(self.respond(request))
        try:
            await self._task
        except StreamClosedError:
            pass  # a write found the connection closed; the task has ended and closed its stream
        except asyncio.CancelledError:
            if not self._client_gone:
                raise
        else:
            return
        logger.info("%s: the client disconnected; generation cancelled", self.request.path)

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self._client_gone = True
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def respond(self, request: GenerationRequest) -> None:
        reply = Reply(f"{self.id_prefix}-{uuid.uuid4().hex}", int(time.time()), self.cluster.model_id,
                      len(request.prompt_ids))
        started = time.perf_counter()
        async with aclosing(self.cluster.astream(list(request.prompt_ids), request.params)) as events:
            first = await self.first_event(events, request)
            if request.stream:
                await self.stream(reply, request, first, events)
            else:
                await self.complete(reply, first, events)
        logger.info("%s %s: %d prompt + %d completion tokens, finish %s, %.2f s%s", self.request.path,
                    reply.response_id, reply.prompt_tokens, reply.completion_tokens, reply.finish_reason,
                    time.perf_counter() - started, f", user {request.user!r}" if request.user else "")

    async def first_event(self, events, request: GenerationRequest):
        """The first event, awaited before any header is sent so refusals keep their status."""
        try:
            return await anext(events)
        except RequestError as exc:
            needed = len(request.prompt_ids) + request.params.max_new_tokens
            code = "context_length_exceeded" if needed > self.cluster.context_length else None
            raise bad_request(str(exc), param=exc.param, code=code) from None

    async def complete(self, reply: "Reply", first, events) -> None:
        texts = [reply.add(first)]
        async for event in events:
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
            event = await anext(events)

    async def send_stream_error(self, exc: Exception) -> None:
        """After the headers are out, an error can only travel as an event (then the stream ends)."""
        self.log_exception(type(exc), exc, exc.__traceback__)
        error = api_error_from(exc)
        await self.send_event(error.body())
        self.finish()

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

    def parse(self, body: dict) -> GenerationRequest:
        return parse_chat_request(body, self.cluster)

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

    def parse(self, body: dict) -> GenerationRequest:
        return parse_completion_request(body, self.cluster)

    def choice(self, text: str, finish_reason: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def chunk_choice(self, text: str | None, finish_reason: str | None) -> dict | None:
        if text is None:
            return None     # completions streams have no opening chunk
        return self.choice(text, finish_reason)
