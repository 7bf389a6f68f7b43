"""Tool calling: chat messages that carry tool calls and results, into the prompt and out of the reply.

Into the prompt (:func:`render_chat`, on the tokenizer thread):
- a chat template that renders tools (it shows a probe tool given as ``tools=``, checked once
  per template) gets OpenAI's conversation as transformers expects it: ``tools=``, assistant
  messages with ``tool_calls`` (arguments as objects), ``role: tool`` messages with
  ``tool_call_id``;
- any other template gets the documented fallback: ``constrain.tool_prompt(tools)`` as the first
  system message (before the client's own system text), each assistant tool call written as text
  in the grammar's format (:func:`call_text`: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``),
  and each run of tool results as one user message in words: ``Function results:`` then a line
  ``<name> returned: <content>`` per result (the name from the assistant call with that id).

Out of the reply: :class:`ReplyCalls` reads the generated text as it streams (``constrain.ToolCallReader``)
into content, or calls with ids ``call_<24 hex>``: streamed as OpenAI's deltas (a call's id, type and
name once its name is whole, then its arguments piece by piece as the model writes them), or whole.
"""
from __future__ import annotations

import json
import uuid

from ..constrain import TOOL_CALL_SEPARATOR, ToolCallReader, format_tool_call, tool_prompt
from ..coordinator.chat import ROLE_ALIASES, apply_chat_template, message_text
from ..errors import RequestError
from .errors import bad_request

PROBE_TOOL = "exo_lab_probe_tool_5c1e"
MESSAGE_FIELDS = {"system": {"role", "content"}, "user": {"role", "content"},
                  "assistant": {"role", "content", "tool_calls"},
                  "tool": {"role", "content", "tool_call_id"}}
# The openai client sends a reply's message back as it came (``messages.append(completion.choices[0]
# .message)``): OpenAI's other message fields are accepted at their defaults (null, or no annotations),
# and "parsed" (the client's own copy of the content, from its parse helpers) whatever its value.
NULL_FIELDS = frozenset({"name", "refusal", "audio", "function_call", "annotations"})
CLIENT_FIELDS = frozenset({"parsed"})
_RENDERS_TOOLS: dict[str, bool] = {}      # chat template text -> whether it renders tools=
# The fallback's tool results: one user message per run of results, in words (models without a tool
# template were not trained on tags for them, and a small one copies tags instead of answering).
TOOL_RESULTS_HEADER = "Function results:\n"
TOOL_RESULT_LINE = "{name} returned: {result}"


def chat_messages(messages) -> list[dict]:
    """Validate OpenAI chat messages (roles system/developer, user, assistant with optional
    tool_calls, tool with tool_call_id) -> [{"role", "content": str, "tool_calls"?, "tool_call_id"?}]."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", param="messages")
    return [chat_message(message, index) for index, message in enumerate(messages)]


def chat_message(message, index: int) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise RequestError(f"{where} must be an object with role and content", param=where)
    role = message.get("role")
    role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if not isinstance(role, str) or role not in MESSAGE_FIELDS:
        raise RequestError(f"{where}.role must be one of system, developer, user, assistant, tool, got "
                           f"{str(role)[:40]!r}", param=f"{where}.role")
    extra = sorted(name for name in set(message) - MESSAGE_FIELDS[role] - CLIENT_FIELDS
                   if name not in NULL_FIELDS or message[name] not in (None, []))
    if extra:
        raise bad_request(f"'{where}.{extra[0]}' is not a field of a {role} message", param=f"{where}.{extra[0]}")
    calls = assistant_calls(message.get("tool_calls"), where) if role == "assistant" else []
    content = message.get("content")
    out = {"role": role, "content": "" if content is None and (calls or role == "assistant") else
           message_text(content, index)}
    if calls:
        out["tool_calls"] = calls
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id or len(call_id) > 256:
            raise RequestError(f"{where}.tool_call_id is required for a tool message: the id of the call it "
                               "answers", param=f"{where}.tool_call_id")
        out["tool_call_id"] = call_id
    return out


def assistant_calls(calls, where: str) -> list[dict]:
    """An assistant message's tool_calls -> [{"id", "name", "arguments": str}]."""
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise RequestError(f"{where}.tool_calls must be a list", param=f"{where}.tool_calls")
    out = []
    for number, call in enumerate(calls):
        at = f"{where}.tool_calls[{number}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                or not isinstance(function.get("arguments", ""), str) or not isinstance(call.get("id", ""), str):
            raise RequestError(f"{at} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                               "\"arguments\": a JSON string}}}}", param=at)
        out.append({"id": call.get("id", ""), "name": function["name"], "arguments": function.get("arguments", "")})
    return out


def plain(messages: list[dict], tools: tuple) -> bool:
    """Whether the conversation needs no tool rendering (the plain chat path)."""
    return not tools and all(m["role"] in ("system", "user", "assistant") and "tool_calls" not in m
                             for m in messages)


# ---------------------------------------------------------------- into the prompt
def render_chat(tokenizer, messages: list[dict], tools: tuple[dict, ...]) -> list[int]:
    """Token ids of the conversation with the assistant's turn opened (runs on the tokenizer thread)."""
    if plain(messages, tools):
        return apply_chat_template(tokenizer, messages)
    if template_renders_tools(tokenizer):
        return template_ids(tokenizer, [template_message(m) for m in messages], list(tools) or None)
    return apply_chat_template(tokenizer, fallback_messages(messages, tools))


def template_renders_tools(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return False
    key = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    if key not in _RENDERS_TOOLS:
        probe = {"type": "function", "function": {"name": PROBE_TOOL, "description": "probe",
                                                  "parameters": {"type": "object", "properties": {}}}}
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[probe],
                                                 add_generation_prompt=True, tokenize=False)
        except Exception:       # a template that fails on tools= does not render them
            text = ""
        _RENDERS_TOOLS[key] = PROBE_TOOL in text
    return _RENDERS_TOOLS[key]


def template_message(message: dict) -> dict:
    """A message as transformers' chat templates expect tool calls (arguments as objects)."""
    out = {"role": message["role"], "content": message["content"]}
    if "tool_calls" in message:
        out["tool_calls"] = [{"id": call["id"], "type": "function",
                              "function": {"name": call["name"], "arguments": _arguments(call["arguments"])}}
                             for call in message["tool_calls"]]
    if "tool_call_id" in message:
        out["tool_call_id"] = message["tool_call_id"]
    return out


def template_ids(tokenizer, messages: list[dict], tools) -> list[int]:
    import jinja2

    try:
        ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
    except jinja2.TemplateError as exc:
        raise RequestError(f"the model's chat template rejected these messages: {exc}", param="messages") from exc
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def fallback_messages(messages: list[dict], tools: tuple[dict, ...]) -> list[dict]:
    """The documented fallback (module docstring) as plain system/user/assistant messages."""
    out: list[dict] = [{"role": "system", "content": tool_prompt(list(tools))}] if tools else []
    names: dict[str, str] = {}                 # call id -> function name, from the assistant's calls
    for message in messages:
        names.update((call["id"], call["name"]) for call in message.get("tool_calls", ()))
        if message["role"] == "tool":
            line = TOOL_RESULT_LINE.format(name=names.get(message["tool_call_id"], "a function"),
                                           result=message["content"])
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + line
            else:
                out.append({"role": "user", "content": TOOL_RESULTS_HEADER + line, "tool_results": True})
            continue
        text = message["content"]
        if message.get("tool_calls"):
            text = "\n".join([text] * bool(text)
                              + [TOOL_CALL_SEPARATOR.join(call_text(call) for call in message["tool_calls"])])
        if message["role"] == "system" and out and out[-1]["role"] == "system":
            out[-1]["content"] += "\n\n" + text          # one system message: the template may want one
        else:
            out.append({"role": message["role"], "content": text})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def call_text(call: dict) -> str:
    """One call in the grammar's text format (:func:`exo_lab.constrain.format_tool_call`)."""
    return format_tool_call(call["name"], _arguments(call["arguments"]))


def _arguments(arguments: str):
    try:
        return json.loads(arguments) if arguments else {}
    except ValueError:
        return arguments        # a client's own malformed arguments: rendered as the text it sent


# ---------------------------------------------------------------- out of the reply
class ReplyCalls:
    """One choice's tools answer in OpenAI's shapes, read as it streams or all at once: a
    :class:`exo_lab.constrain.ToolCallReader` plus an id per call (``call_<24 hex>``, given when
    the call's name is whole, so streamed deltas and the final message agree)."""

    def __init__(self, text: str = ""):
        self.reader = ToolCallReader()
        self.ids: list[str] = []
        self.closed = False
        self.feed(text)

    def feed(self, text: str) -> list[dict]:
        """The chat deltas for ``text``: {"content"} pieces, a call's opening {"tool_calls": [{index,
        id, type, function: {name, arguments: ""}}]}, then its arguments in pieces as written."""
        return self._deltas(self.reader.feed(text) if text else [])

    def deltas(self, text: str, finish_reason: str | None) -> list[dict]:
        """:meth:`feed` ``text``, then :meth:`close` when the answer ends with it (``finish_reason``)."""
        return self.feed(text) + (self.close(finish_reason) if finish_reason is not None else [])

    def close(self, finish_reason: str) -> list[dict]:
        """The deltas still held back when the answer ends (see ToolCallReader.close); once."""
        if self.closed:
            return []
        self.closed = True
        return self._deltas(self.reader.close(cut=finish_reason == "length"))

    def _deltas(self, events: list[tuple]) -> list[dict]:
        deltas = []
        for event in events:
            if event[0] == "content":
                deltas.append({"content": event[1]})
            elif event[0] == "call":
                self.ids.append(new_call_id())
                deltas.append({"tool_calls": [{"index": event[1], "id": self.ids[event[1]], "type": "function",
                                               "function": {"name": event[2], "arguments": ""}}]})
            else:
                deltas.append({"tool_calls": [{"index": event[1], "function": {"arguments": event[2]}}]})
        return deltas

    def output(self, finish_reason: str) -> tuple[str | None, list[dict], str]:
        """(content or None, calls [{"id", "type", "function": {"name", "arguments"}}], finish reason):
        "tool_calls" when there are calls, unless max_tokens cut the answer ("length", as OpenAI;
        a call cut in its arguments is returned with the arguments written so far)."""
        self.close(finish_reason)
        content, calls = self.reader.result()
        return content, [{"id": self.ids[index], "type": "function",
                          "function": {"name": call["name"], "arguments": call["arguments"]}}
                         for index, call in enumerate(calls)], \
            "tool_calls" if calls and finish_reason != "length" else finish_reason

    def complete(self, index: int) -> bool:
        """Whether call ``index`` was written whole (not cut by max_tokens)."""
        return self.reader.result()[1][index]["complete"]


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]
