"""POST /v1/responses, stateless: OpenAI's Responses API over the chat machinery.

``input`` (text, or items: messages with input_text / output_text parts, function_call and
function_call_output items) and ``instructions`` become chat messages; function ``tools``
({type, name, description, parameters, strict}), ``tool_choice`` and ``text.format`` become chat's
tools and response_format, so the same grammar constrains the output. Nothing is kept: ``store:
true`` and ``previous_response_id`` are refused with a 400. Streaming sends the typed events the
openai SDK reads, each with its ``sequence_number``.
"""
from __future__ import annotations

import uuid

from . import features
from .base import dumps
from .errors import bad_request
from .features import Decoding
from .generation import ChatCompletionsHandler, chat_output, reply_calls
from .params import SHARED_DEFAULT_ONLY, chat_request, check_fields, check_model, integer
from .tenants import client_address

RESPONSE_FIELDS = frozenset({"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text",
                             "max_output_tokens", "temperature", "top_p", "seed", "stream", "store", "user",
                             "previous_response_id", "metadata"})
RESPONSE_DEFAULT_ONLY = {**SHARED_DEFAULT_ONLY,
                         "truncation": ((None, "disabled"), '"disabled" (the input is never cut)')}
ROLES = ("user", "system", "developer", "assistant")


def chat_messages(body: dict) -> list[dict]:
    """``instructions`` and ``input`` as chat messages (OpenAI's chat shape)."""
    messages = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad_request("'instructions' must be a string", param="instructions")
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise bad_request("'input' must be a string or a non-empty list of items", param="input")
    for index, item in enumerate(items):
        messages.append(chat_message(item, index, messages))
    return [message for message in messages if message is not None]


def chat_message(item, index: int, messages: list) -> dict | None:
    where = f"input[{index}]"
    kind = item.get("type", "message") if isinstance(item, dict) else None
    if kind == "message" and item.get("role") in ROLES:
        return {"role": item["role"], "content": message_content(item.get("content"), where)}
    if kind == "function_call":
        call = {"id": item.get("call_id"), "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
        if messages and messages[-1]["role"] == "assistant" and "tool_calls" in messages[-1]:
            messages[-1]["tool_calls"].append(call)      # parallel calls: one assistant turn
            return None
        return {"role": "assistant", "content": None, "tool_calls": [call]}
    if kind == "function_call_output":
        output = item.get("output")
        return {"role": "tool", "tool_call_id": item.get("call_id"),
                "content": output if isinstance(output, str) else message_content(output, where)}
    raise bad_request(f"'{where}' must be a message (role user, system, developer or assistant), a function_call "
                      "or a function_call_output item", param=where)


def message_content(content, where: str):
    """A message's content: a string, or input_text / output_text parts -> chat text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [{"type": "text", "text": part.get("text")} for part in content
                 if isinstance(part, dict) and part.get("type") in ("input_text", "output_text")]
        if len(parts) == len(content):
            return parts
    raise bad_request(f"'{where}.content' must be a string or a list of input_text / output_text parts",
                      param=f"{where}.content")


def decoding(body: dict) -> Decoding:
    tools = features.tools([chat_tool(tool, index) for index, tool in enumerate(body["tools"])]
                           if isinstance(body.get("tools"), list) else body.get("tools"))
    choice = features.tool_choice(body.get("tool_choice"), tools)
    fmt = text_format(body.get("text"))
    features.check_combination(fmt, tools, choice, param="text.format")
    return Decoding(response_format=fmt, tools=tools, tool_choice=choice,
                    parallel_tool_calls=features.parallel_tool_calls(body))


def chat_tool(tool, index: int) -> dict:
    """A Responses function tool {type, name, ...} in chat's shape {type, function: {name, ...}}."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise bad_request(f"'tools[{index}]' must be a function tool {{\"type\": \"function\", \"name\", "
                          "\"parameters\"}} (only function tools are supported)", param=f"tools[{index}]")
    return {"type": "function", "function": {name: value for name, value in tool.items() if name != "type"}}


def text_format(text) -> dict | None:
    if text is None:
        return None
    if not isinstance(text, dict) or set(text) - {"format", "verbosity"} or text.get("verbosity") not in (None, "medium"):
        raise bad_request("'text' must be {\"format\": {...}}", param="text")
    fmt = text.get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return features.json_schema_format({k: v for k, v in fmt.items() if k != "type"}, "text.format")
    return features.response_format(fmt, "text.format")


class ResponsesHandler(ChatCompletionsHandler):
    """POST /v1/responses."""

    def new_response_id(self) -> str:
        return new_id("resp")       # OpenAI's Response ids: resp_<hex> (items msg_<hex>, fc_<hex>)

    async def parse(self, body: dict):
        check_fields(body, RESPONSE_FIELDS, RESPONSE_DEFAULT_ONLY)
        for name in ("store", "previous_response_id"):
            if body.get(name) not in (None, False):
                raise bad_request(f"'{name}' is not supported: this server keeps no responses (it is stateless); "
                                  "send the whole conversation as 'input'", param=name, code="unsupported_parameter")
        model = check_model(body, self.cluster, self.server.model_names)
        wanted = decoding(body)
        chat_body = {name: body[name] for name in ("temperature", "top_p", "seed", "stream", "user") if name in body}
        max_tokens = integer(body, "max_output_tokens", minimum=1)
        if max_tokens is not None:
            chat_body["max_tokens"] = max_tokens
        self.body = body
        return await chat_request(chat_body, self.cluster, model, chat_messages(body), wanted,
                                  client_address(self.request.remote_ip))

    # ------------------------------------------------------------ the Response object
    def response(self, reply, request, status: str, output: list) -> dict:
        body = self.body
        usage = reply.usage()
        fmt = request.decoding.response_format
        return {
            "id": reply.response_id, "object": "response", "created_at": reply.created, "status": status,
            "model": reply.model, "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.get("instructions"), "metadata": body.get("metadata") or {},
            "parallel_tool_calls": request.decoding.parallel_tool_calls,
            "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
            "temperature": request.params.temperature, "top_p": request.params.top_p,
            "max_output_tokens": body.get("max_output_tokens"), "previous_response_id": None, "store": False,
            "text": {"format": {"type": "text"} if fmt is None else
                     fmt if fmt["type"] == "json_object" else dict(fmt)},
            "usage": None if status == "in_progress" else {
                "input_tokens": usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage["total_tokens"]},
        }

    def output_items(self, choice, request, ids: dict | None = None) -> tuple[list[dict], str]:
        """The Response's output items and status; ``ids``: the item ids a stream already gave
        ("msg" for the message, a call's index for its function_call)."""
        ids = ids or {}
        content, calls, finish_reason = chat_output(choice, request)
        items = []
        if content or not calls:
            items.append(message_item(ids.get("msg") or new_id("msg"), content or "", "completed"))
        items.extend({"type": "function_call", "id": ids.get(index) or new_id("fc"), "call_id": call["id"],
                      "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                      "status": "completed" if reply_calls(choice).complete(index) else "incomplete"}
                     for index, call in enumerate(calls))
        return items, "incomplete" if finish_reason == "length" else "completed"

    async def complete(self, reply, request, firsts, streams) -> None:
        await self.drain(reply.choices[0], firsts[0], streams[0])
        items, status = self.output_items(reply.choices[0], request)
        self.write_json(self.response(reply, request, status, items))

    # ------------------------------------------------------------ streaming
    async def stream(self, reply, request, firsts, streams) -> None:
        """Typed events as the output is written: a message's text deltas, or per function call
        its item (name, call_id) once the name is whole, then its arguments' deltas as written;
        then each item's done events and response.completed (or .incomplete)."""
        self.start_event_stream()
        self.sequence = 0
        choice = reply.choices[0]
        await self.emit("response.created", response=self.response(reply, request, "in_progress", []))
        await self.emit("response.in_progress", response=self.response(reply, request, "in_progress", []))
        calls = reply_calls(choice) if request.decoding.calls_tools else None
        ids: dict = {}                     # "msg" / call index -> the item id streamed
        try:
            async for event in self.events_of(firsts[0], streams[0]):
                choice.add(event)
                deltas = calls.deltas(event.text, event.finish_reason) if calls else \
                    [{"content": event.text}] * bool(event.text)
                for delta in deltas:
                    await self.send_delta(delta, ids)
        except Exception as exc:      # after the headers, an error can only travel as an event
            self.log_exception(type(exc), exc, exc.__traceback__)
            await self.emit("error", **self.client_error(exc).body()["error"])
            self.finish()
            return
        items, status = self.output_items(choice, request, ids)
        for index, item in enumerate(items):
            if item["type"] == "message":
                if "msg" not in ids:
                    await self.open_text(item["id"], index)
                    await self.emit("response.output_text.delta", item_id=item["id"], output_index=index,
                                    content_index=0, delta=item["content"][0]["text"], logprobs=[])
                await self.close_text(item, index)
            else:
                await self.emit("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                name=item["name"], arguments=item["arguments"])
                await self.emit("response.output_item.done", output_index=index, item=item)
        # as OpenAI: a response cut by max_output_tokens ends with response.incomplete
        await self.emit(f"response.{status}", response=self.response(reply, request, status, items))
        self.finish()

    async def send_delta(self, delta: dict, ids: dict) -> None:
        """One chat delta (tools.ReplyCalls' shapes) as Responses events; the output is either the
        message (index 0) or the calls (index = the call's), never both."""
        if "content" in delta:
            if "msg" not in ids:
                ids["msg"] = new_id("msg")
                await self.open_text(ids["msg"], 0)
            await self.emit("response.output_text.delta", item_id=ids["msg"], output_index=0, content_index=0,
                            delta=delta["content"], logprobs=[])
            return
        call = delta["tool_calls"][0]
        index = call["index"]
        if "id" in call:
            ids[index] = new_id("fc")
            await self.emit("response.output_item.added", output_index=index, item={
                "type": "function_call", "id": ids[index], "call_id": call["id"], "name": call["function"]["name"],
                "arguments": "", "status": "in_progress"})
        else:
            await self.emit("response.function_call_arguments.delta", item_id=ids[index], output_index=index,
                            delta=call["function"]["arguments"])

    async def open_text(self, item_id: str, index: int) -> None:
        await self.emit("response.output_item.added", output_index=index,
                        item=message_item(item_id, None, "in_progress"))
        await self.emit("response.content_part.added", item_id=item_id, output_index=index, content_index=0,
                        part=text_part(""))

    async def close_text(self, item: dict, index: int) -> None:
        text = item["content"][0]["text"]
        await self.emit("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                        text=text, logprobs=[])
        await self.emit("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                        part=text_part(text))
        await self.emit("response.output_item.done", output_index=index, item=item)

    async def emit(self, kind: str, **fields) -> None:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        await self.send_raw(b"event: " + kind.encode() + b"\ndata: " + dumps(payload) + b"\n\n")


def message_item(item_id: str, text: str | None, status: str) -> dict:
    return {"type": "message", "id": item_id, "role": "assistant", "status": status,
            "content": [] if text is None else [text_part(text)]}


def text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"

