"""Constrained decoding on the coordinator: JSON schemas and tool calls become, token by token,
the allowed-token bitmask the last stage applies (:class:`exo_lab.sampling.LogitRule`).

Engine: llguidance, chosen by measuring (``python benchmarks/bench_grammar.py --walks 20``) on
SmolLM2's 49,152-token vocabulary, on this 2-core CPU, with the five :data:`EXAMPLE_SCHEMAS`
(20 random walks over allowed tokens each, every mask timed; compile cold, no cache)::

    schema           engine      compile ms  tokens  mask mean us  p99 us  max us
    nested_objects   llguidance         2.4     871            50     481    1635
    nested_objects   xgrammar           8.2    1062             4      17      82
    enums            llguidance         0.6     388            20      64     118
    enums            xgrammar           0.8     580             2       6      15
    arrays           llguidance         0.7     446            45     462     561
    arrays           xgrammar           5.9     583             4      22      41
    bounded_numbers  llguidance         0.7     587            13      38     118
    bounded_numbers  xgrammar           1.6     735             2       5      15
    required_fields  llguidance         0.7     497            56     484     601
    required_fields  xgrammar           6.0     531             5      20      52

xgrammar's masks are ~10x faster, but both are far below 1% of a SmolLM2 decode step (tens of
ms), so mask time does not decide. Safety does: on hostile schemas xgrammar compiled a 300-
property schema with patterns (15 KB) in 11.4 s of uninterruptible C++, and silently accepted
``not`` and ``allOf`` of ``anyOf`` (output that need not validate), while llguidance compiled a
1,500-property one in 0.2 s, refuses ``allOf``x``anyOf`` blow-ups ("schema too large", 35 ms),
names every keyword it does not implement, and bounds its own work per step
(:class:`llguidance.LLParserLimits`: lexer fuel, Earley items, lexer states, grammar size) because
its lexer and masks are computed lazily. Its mask comes back as bytes in LogitRule's
little-endian uint32 layout. outlines-core was not measured (not installed).

Limits, each refused with :class:`SchemaError` (a 400 naming the fix): the schema's JSON at most
:data:`MAX_SCHEMA_BYTES`, nesting at most :data:`MAX_SCHEMA_DEPTH` levels, at most
:data:`MAX_PROPERTIES` properties and :data:`MAX_ENUM_VALUES` enum values in all, the compile
within :data:`COMPILE_TIMEOUT_S` (on a small pool of worker threads, inside llguidance's
limits :data:`PARSER_LIMITS`), no remote ``$ref``, and keywords llguidance does not implement
(``not``, ``if``/``then``/``else``, ``uniqueItems``, ``contains``, ``dependentRequired``, ...)
unless ``strict=False``. Compiled grammars are cached per (schema, tokenizer) in a small LRU.
Numbers the schema leaves unbounded are bounded (:func:`bound_numbers`: NUMBER_FRACTION_DIGITS,
NUMBER_MAX_ABS), so no model can write digits for ever.

Tool calls are emitted as text, one per call, as Hermes and Qwen chat templates do::

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

Compiling blocks for up to :data:`COMPILE_TIMEOUT_S` on a cache miss: call it from an event loop
through ``loop.run_in_executor``.
"""
from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import pathlib
import re
import threading
import weakref
from typing import Any, Callable

from .errors import ExoLabError, RequestError

logger = logging.getLogger(__name__)

MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 32          # nested JSON containers (dicts and lists) in the schema document
MAX_PROPERTIES = 1024          # summed over every "properties" in the schema
MAX_ENUM_VALUES = 1024         # summed over every "enum" in the schema
COMPILE_TIMEOUT_S = 2.0
COMPILE_THREADS = 2
CACHE_ENTRIES = 64             # compiled grammars kept per tokenizer

# Every JSON number the grammar lets a model write has at most NUMBER_FRACTION_DIGITS digits after
# the point and a magnitude of at most NUMBER_MAX_ABS (16 digits), as llama.cpp's JSON grammars
# bound them: without a bound a model can write digits until max_tokens ("lon": 1.891355363454525
# 6...) and the answer never parses. The bounds are added only where the schema sets none of its
# own (multipleOf, minimum/maximum), so every output still validates against the schema as given.
# 10 is the most llguidance's multipleOf takes (1e-11 fails to compile).
NUMBER_FRACTION_DIGITS = 10
NUMBER_MAX_ABS = 10 ** 15
_SCHEMA_DATA_KEYS = frozenset({"enum", "const", "default", "examples"})   # values, not schemas

# Compact separators, no free whitespace: what chat models write, and a random walk (or a model
# stuck in a loop) cannot pad the output with endless whitespace.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_CALL_SEPARATOR = "\n"     # between parallel calls
# How Hermes/Qwen templates show tool results: an answer in text never writes it (a model that
# starts it is imitating the format, not answering).
TOOL_RESPONSE_OPEN = "<tool_response>"
FUNCTION_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")   # OpenAI's rule for names

TOOL_PROMPT_TEMPLATE = """\
You may call functions to answer. Their signatures, as JSON schemas, are inside <tools></tools>:
<tools>
{tools}
</tools>
To call a function, write nothing but one line per call, in this form, each call once:
{open}{{"name": "<function name>", "arguments": <the arguments as a JSON object>}}{close}
When the results come back, answer the user in plain text."""

# The five representative schemas the numbers above were measured on (benchmarks and tests).
EXAMPLE_SCHEMAS: dict[str, dict] = {
    "nested_objects": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "address": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 20},
                "geo": {"type": "object", "properties": {
                    "lat": {"type": "number", "minimum": -90, "maximum": 90},
                    "lon": {"type": "number", "minimum": -180, "maximum": 180}},
                    "required": ["lat", "lon"], "additionalProperties": False}},
                "required": ["city", "geo"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False},
    "enums": {
        "type": "object",
        "properties": {
            "status": {"enum": ["open", "closed", "pending", "won't fix"]},
            "priority": {"enum": [1, 2, 3]},
            "flag": {"enum": [True, False, None]}},
        "required": ["status", "priority", "flag"], "additionalProperties": False},
    "arrays": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                     "minItems": 1, "maxItems": 4},
            "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
                       "minItems": 2, "maxItems": 5}},
        "required": ["tags", "scores"], "additionalProperties": False},
    "bounded_numbers": {
        "type": "object",
        "properties": {
            "celsius": {"type": "number", "minimum": -50, "maximum": 60},
            "count": {"type": "integer", "minimum": 0, "maximum": 1000},
            "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}},
        "required": ["celsius", "count", "ratio"], "additionalProperties": False},
    "required_fields": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 99999},
            "email": {"type": "string", "maxLength": 30},
            "nickname": {"type": "string", "maxLength": 12},
            "verified": {"type": "boolean"}},
        "required": ["id", "email"], "additionalProperties": False},
}


class SchemaError(RequestError):
    """A JSON schema or tool list that constrained decoding cannot or will not compile; the
    message names the feature or limit and the fix. ``param`` is the request field."""


class GrammarViolation(ExoLabError):
    """A token outside the grammar's mask reached :meth:`GrammarProcessor.accept` (a bug in
    whatever applied the mask)."""


def _parser_limits():
    import llguidance
    # Lower than llguidance's defaults: a step's worst case stays a few ms on one core (fuel
    # ~14k/ms, items ~20k/ms) and the lexer's memory ~100 MB (1-2 kB per state).
    return llguidance.LLParserLimits(
        step_lexer_fuel=100_000, step_max_items=20_000, max_lexer_states=50_000,
        max_grammar_size=200_000, initial_lexer_fuel=1_000_000, verbose_errors=False)


PARSER_LIMITS = "step_lexer_fuel=100k, step_max_items=20k, max_lexer_states=50k, " \
                "max_grammar_size=200k, initial_lexer_fuel=1M"


class GrammarProcessor:
    """One request's (or one choice's) matcher: the ``LogitProcessor`` the data plane drives."""

    def __init__(self, matcher, first_mask: bytes):
        self._matcher = matcher
        self._mask: bytes | None = first_mask

    def next_rule(self):
        """The allowed tokens for the next position (only EOS once the grammar is complete)."""
        from .sampling import LogitRule
        if self._mask is None:
            self._mask = self._matcher.compute_bitmask()
            if self._matcher.is_error():
                raise GrammarViolation(f"grammar mask failed: {self._matcher.get_error()}")
        return LogitRule(allowed=self._mask)

    def accept(self, token_id: int) -> None:
        """Advance by the token the request got. Raises GrammarViolation for a masked token."""
        if not self._matcher.consume_token(int(token_id)):
            raise GrammarViolation(f"token {token_id} is outside the grammar's mask: "
                                   f"{self._matcher.get_error()}")
        self._mask = None

    def finished(self) -> bool:
        """True once the grammar is complete (only EOS may follow): finish_reason "stop"."""
        return self._matcher.is_stopped()


class Grammar:
    """A compiled grammar for one tokenizer; :meth:`processor` starts a fresh matcher."""

    def __init__(self, kind: str, matcher, first_mask: bytes):
        self.kind = kind
        self._template = matcher
        self._first_mask = first_mask

    def processor(self) -> GrammarProcessor:
        """A fresh matcher at the grammar's start, for one request or one of its n choices."""
        return GrammarProcessor(self._template.deep_copy(), self._first_mask)

    def __repr__(self) -> str:
        return f"Grammar({self.kind})"


# ---- public constructors -------------------------------------------------------------------

def compile_json_schema(schema: dict, tokenizer, *, strict: bool = True) -> Grammar:
    """Compile ``schema`` (a JSON Schema object, as in ``response_format.json_schema.schema``)
    for ``tokenizer`` (a Hugging Face tokenizer). ``strict=False`` ignores keywords the engine
    does not implement (the output is then not checked against them) instead of refusing.

    Raises SchemaError (param "response_format") for a schema over the limits, unsupported
    features, an unsatisfiable or invalid schema, or a compile over COMPILE_TIMEOUT_S."""
    check_schema(schema, param="response_format")
    return _cached(tokenizer, ("json_schema", _canonical(schema), strict), "response_format",
                   lambda llg: llg.LLMatcher.grammar_from_json_schema(
                       bound_numbers(schema), defaults=JSON_OPTIONS,
                       overrides={"lenient": not strict}))


def json_object_grammar(tokenizer) -> Grammar:
    """Any JSON object (``response_format: {"type": "json_object"}``), its numbers bounded as
    everywhere (NUMBER_FRACTION_DIGITS, NUMBER_MAX_ABS)."""
    return _cached(tokenizer, ("json_object",), "response_format",
                   lambda llg: llg.LLMatcher.grammar_from_json_schema(
                       ANY_JSON_OBJECT, defaults=JSON_OPTIONS))


def tool_call_grammar(tools: list[dict], tool_choice, parallel_tool_calls: bool,
                      tokenizer) -> Grammar:
    """The grammar of an answer to a request with OpenAI ``tools``: ``tool_choice`` "auto"
    (plain text, or tool calls), "required" (at least one call), "none" (plain text without
    calls), or ``{"type": "function", "function": {"name": ...}}`` (exactly one call of it).
    ``parallel_tool_calls`` allows several calls, one per line. Every call's arguments follow
    its function's ``parameters`` schema. Raises SchemaError (param "tools" or "tool_choice")."""
    functions = _functions(tools)
    mode, functions = _choose(tool_choice, functions)
    calls_schema = {"anyOf": [_call_schema(name, params) for name, params in functions.items()],
                    "x-guidance": JSON_OPTIONS}
    call = f'"{TOOL_CALL_OPEN}" %json {json.dumps(calls_schema)} "{TOOL_CALL_CLOSE}"'
    repeat = f'({json.dumps(TOOL_CALL_SEPARATOR)} call)*' if parallel_tool_calls and \
        mode != "named" else ""
    start = {"auto": "TEXT | calls", "required": "calls", "named": "calls", "none": "TEXT"}[mode]
    lark = (f"start: {start}\ncalls: call {repeat}\ncall: {call}\n"
            f"TEXT: /(?s:.+)/ & ~/(?s:.*({re.escape(TOOL_CALL_OPEN)}|{re.escape(TOOL_RESPONSE_OPEN)}).*)/\n")
    return _cached(tokenizer, ("tools", lark), "tools", lambda llg: llg.LLMatcher.grammar_from_lark(lark))


def bound_numbers(schema: Any) -> Any:
    """A copy of ``schema`` in which every number or integer subschema without bounds of its own
    gets them: ``multipleOf`` 10**-NUMBER_FRACTION_DIGITS (numbers) and minimum/maximum
    -/+NUMBER_MAX_ABS, each side only where the schema sets neither it nor its exclusive form.
    What the copy accepts, the original accepts (the bounds only narrow)."""
    if isinstance(schema, list):
        return [bound_numbers(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    bounded = {key: value if key in _SCHEMA_DATA_KEYS else bound_numbers(value)
               for key, value in schema.items()}
    kinds = schema.get("type")
    kinds = {kinds} if isinstance(kinds, str) else set(kinds) if isinstance(kinds, list) else set()
    if not kinds & {"number", "integer"}:
        return bounded
    if "number" in kinds and "multipleOf" not in schema:
        bounded["multipleOf"] = 10.0 ** -NUMBER_FRACTION_DIGITS
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    if low is None and not (_is_number(high) and high < -NUMBER_MAX_ABS):
        bounded["minimum"] = -NUMBER_MAX_ABS
    if high is None and not (_is_number(low) and low > NUMBER_MAX_ABS):
        bounded["maximum"] = NUMBER_MAX_ABS
    return bounded


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# response_format json_object: an object whose values are any JSON, numbers bounded.
ANY_JSON_OBJECT = {
    "$defs": {"value": {"anyOf": [
        {"type": "string"}, {"type": "boolean"}, {"type": "null"},
        bound_numbers({"type": "number"}),
        {"type": "array", "items": {"$ref": "#/$defs/value"}},
        {"type": "object", "additionalProperties": {"$ref": "#/$defs/value"}}]}},
    "type": "object", "additionalProperties": {"$ref": "#/$defs/value"}}


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """Split a whole tools answer into its content (None when it is calls) and its calls, each
    ``{"name", "arguments": the JSON text as written, "complete": bool}``: :class:`ToolCallReader`
    fed all at once."""
    reader = ToolCallReader()
    reader.feed(text)
    reader.close(cut=False)
    return reader.result()


class ToolCallReader:
    """Reads a tools answer as it streams, in the grammar's format (:func:`tool_call_grammar`):
    either plain text from the first character on (content), or calls from the first character
    on, ``<tool_call>{"name": "<name>", "arguments": <JSON>}</tool_call>`` joined by
    TOOL_CALL_SEPARATOR. :meth:`feed` returns what became known, in order:
    ``("content", text)``, ``("call", index, name)`` once a call's name is whole, and
    ``("arguments", index, text)`` for each piece of its arguments as written (the arguments'
    JSON is scanned, so a string holding ``</tool_call>`` cannot end it). Text that leaves the
    format (only possible without the grammar) is content from there on."""

    # the fixed text around a call's name, as format_tool_call and the grammar write it
    _HEAD = TOOL_CALL_OPEN + '{"name"' + JSON_OPTIONS["key_separator"] + '"'
    _NAME_END = '"' + JSON_OPTIONS["item_separator"] + '"arguments"' + JSON_OPTIONS["key_separator"]
    _CLOSE = "}" + TOOL_CALL_CLOSE

    def __init__(self):
        self._pending = ""            # received, not yet decided
        self._state = "start"         # start, name, after_name, arguments, close, between, text
        self._content: list[str] = []
        self._calls: list[dict] = []
        self._depth = 0               # in the arguments: open containers, and whether in a string
        self._in_string = False
        self._escaped = False

    def feed(self, text: str) -> list[tuple]:
        events: list[tuple] = []
        self._pending += text
        while self._pending and self._step(events):
            pass
        return events

    def close(self, cut: bool) -> list[tuple]:
        """The answer ended (``cut``: by max_tokens). Text held back because it began like a call
        is content if the answer ended on its own, and a call cut before its name if cut."""
        events: list[tuple] = []
        if self._state == "start" and not cut:
            self._emit_content(events, self._pending)
        self._pending, self._state = "", "closed"
        return events

    def result(self) -> tuple[str | None, list[dict]]:
        """(content or None, calls): each call ``{"name", "arguments", "complete"}``; a call cut
        before its name was whole is left out, one cut in its arguments has ``complete`` False."""
        return "".join(self._content) or None, [dict(call) for call in self._calls]

    # -- one step: consume what can be decided; False when more text is needed
    def _step(self, events: list[tuple]) -> bool:
        state, pending = self._state, self._pending
        if state == "text":
            self._emit_content(events, pending)
            return False
        if state == "closed":
            raise ValueError("text fed to a ToolCallReader after close()")
        if state in ("start", "between"):
            expected = (TOOL_CALL_SEPARATOR if state == "between" else "") + self._HEAD
            if not pending.startswith(expected):
                if expected.startswith(pending):
                    return False                              # still a prefix: wait
                self._state = "text"                          # not a call: content from here
                return True
            self._pending, self._state = pending[len(expected):], "name"
            return True
        if state == "name":
            end = pending.find('"')
            if end < 0:
                return False
            self._calls.append({"name": pending[:end], "arguments": "", "complete": False})
            self._pending, self._state = pending[end:], "after_name"
            return True
        if state == "after_name":
            if not pending.startswith(self._NAME_END):
                if self._NAME_END.startswith(pending):
                    return False
                self._calls.pop()
                self._state = "text"
                return True
            events.append(("call", len(self._calls) - 1, self._calls[-1]["name"]))
            self._pending, self._state = pending[len(self._NAME_END):], "arguments"
            self._depth, self._in_string, self._escaped = 0, False, False
            return True
        if state == "arguments":
            end = self._scan_arguments(pending)
            piece = pending if end is None else pending[:end]
            if piece:
                self._calls[-1]["arguments"] += piece
                events.append(("arguments", len(self._calls) - 1, piece))
            self._pending = "" if end is None else pending[end:]
            if end is not None:
                self._state = "close"
            return end is not None
        if state == "close":
            if not pending.startswith(self._CLOSE):
                if self._CLOSE.startswith(pending):
                    return False
                self._state = "text"
                return True
            self._calls[-1]["complete"] = True
            self._pending, self._state = pending[len(self._CLOSE):], "between"
            return True
        raise AssertionError(state)

    def _scan_arguments(self, text: str) -> int | None:
        """Where in ``text`` the arguments end (the call object's closing brace), or None."""
        for at, char in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                if self._depth == 0:
                    return at
                self._depth -= 1
        return None

    def _emit_content(self, events: list[tuple], text: str) -> None:
        if text:
            self._content.append(text)
            events.append(("content", text))
        self._pending = ""


def format_tool_call(name: str, arguments) -> str:
    """One call as the grammar writes it (what :func:`parse_tool_calls` reads back): ``arguments``
    a JSON value, or a client's own text when it is not JSON (rendered as that text)."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False,
                      separators=(JSON_OPTIONS["item_separator"], JSON_OPTIONS["key_separator"]))
    return TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE


def tool_prompt(tools: list[dict]) -> str:
    """The system-prompt text that tells a model whose chat template does not render tools how
    to call them, in the TOOL_CALL_OPEN/CLOSE format :func:`parse_tool_calls` reads."""
    lines = "\n".join(json.dumps({"type": "function", "function": tool["function"]},
                                 ensure_ascii=False) for tool in tools)
    return TOOL_PROMPT_TEMPLATE.format(tools=lines, open=TOOL_CALL_OPEN, close=TOOL_CALL_CLOSE)


def check_schema(schema: Any, *, param: str) -> None:
    """Refuse a schema over the size, nesting, property or enum limits, or with a remote $ref."""
    if not isinstance(schema, dict):
        raise SchemaError(f"a JSON schema must be an object, not {type(schema).__name__}", param)
    size = len(json.dumps(schema, ensure_ascii=False).encode())
    if size > MAX_SCHEMA_BYTES:
        raise SchemaError(f"the JSON schema is {size} bytes; at most {MAX_SCHEMA_BYTES} are "
                          "allowed: shorten descriptions or split the task", param)
    counts = collections.Counter()
    _walk(schema, 1, counts, param)
    for key, limit in (("properties", MAX_PROPERTIES), ("enum", MAX_ENUM_VALUES)):
        if counts[key] > limit:
            raise SchemaError(f"the JSON schema has {counts[key]} {key} values in all; at most "
                              f"{limit} are allowed: use a string with a pattern, or fewer "
                              "choices", param)


# ---- internals -----------------------------------------------------------------------------

def _walk(node: Any, depth: int, counts: collections.Counter, param: str) -> None:
    if depth > MAX_SCHEMA_DEPTH:
        raise SchemaError(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels (objects "
                          "and lists): flatten it", param)
    children = node.values() if isinstance(node, dict) else node
    if isinstance(node, dict):
        for key in ("properties", "enum"):
            if isinstance(node.get(key), (dict, list)):
                counts[key] += len(node[key])
        ref = node.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            raise SchemaError(f"$ref {ref!r} points outside the schema, which is not supported: "
                              "put the referenced schema under \"$defs\" and refer to it as "
                              "\"#/$defs/<name>\"", param)
    for child in children:
        if isinstance(child, (dict, list)):
            _walk(child, depth + 1, counts, param)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _functions(tools: Any) -> dict[str, dict]:
    if not isinstance(tools, list) or not tools:
        raise SchemaError("tools must be a non-empty list of {\"type\": \"function\", "
                          "\"function\": {\"name\": ..., \"parameters\": {...}}}", "tools")
    functions = {}
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or \
                not isinstance(function, dict):
            raise SchemaError(f"tools[{index}] must be {{\"type\": \"function\", \"function\": "
                              "{...}}", "tools")
        name = function.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME_PATTERN.match(name):
            raise SchemaError(f"tools[{index}].function.name must be 1-64 letters, digits, _ "
                              f"or -, not {name!r}", "tools")
        if name in functions:
            raise SchemaError(f"tools[{index}]: function {name!r} is defined twice", "tools")
        params = function.get("parameters", {"type": "object", "properties": {}})
        check_schema(params, param="tools")
        functions[name] = params
    check_schema({"anyOf": list(functions.values())}, param="tools")
    return functions


def _choose(tool_choice: Any, functions: dict[str, dict]) -> tuple[str, dict[str, dict]]:
    if tool_choice in ("auto", "required", "none"):
        return tool_choice, functions
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or \
            not isinstance(name, str):
        raise SchemaError("tool_choice must be \"auto\", \"none\", \"required\" or {\"type\": "
                          "\"function\", \"function\": {\"name\": ...}}", "tool_choice")
    if name not in functions:
        raise SchemaError(f"tool_choice names function {name!r}, which is not in tools "
                          f"({', '.join(functions)})", "tool_choice")
    return "named", {name: functions[name]}


def _call_schema(name: str, params: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": name},
                                             "arguments": bound_numbers(params)},
            "required": ["name", "arguments"], "additionalProperties": False}


class _TokenizerGrammars:
    """The llguidance view of one Hugging Face tokenizer and its LRU of compiled grammars."""

    def __init__(self, tokenizer):
        import llguidance.hf
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, eos_token=_eos_ids(tokenizer))
        self.cache: collections.OrderedDict[tuple, Grammar] = collections.OrderedDict()


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
_POOL = concurrent.futures.ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="exo-grammar")


def _state(tokenizer) -> _TokenizerGrammars:
    with _LOCK:
        state = _STATES.get(tokenizer)
        if state is None:
            state = _STATES[tokenizer] = _TokenizerGrammars(tokenizer)
        return state


def _cached(tokenizer, key: tuple, param: str, build: Callable) -> Grammar:
    state = _state(tokenizer)
    with _LOCK:
        if key in state.cache:
            state.cache.move_to_end(key)
            return state.cache[key]
    future = _POOL.submit(_compile, state.tokenizer, key[0], build, param)
    try:
        grammar = future.result(timeout=COMPILE_TIMEOUT_S)
    except concurrent.futures.TimeoutError:
        future.cancel()   # if still queued; a running compile ends within llguidance's limits
        raise SchemaError(f"compiling the grammar took longer than {COMPILE_TIMEOUT_S:g} s: "
                          "simplify the schema (fewer anyOf/allOf branches, shorter patterns)",
                          param) from None
    with _LOCK:
        state.cache[key] = grammar
        if len(state.cache) > CACHE_ENTRIES:
            state.cache.popitem(last=False)
    return grammar


def _compile(lltokenizer, kind: str, build: Callable, param: str) -> Grammar:
    import llguidance
    try:
        grammar = build(llguidance)
    except ValueError as exc:
        raise SchemaError(f"the schema is not valid JSON: {exc}", param) from exc
    matcher = llguidance.LLMatcher(lltokenizer, grammar, log_level=0, limits=_parser_limits())
    first_mask = b"" if matcher.is_error() else matcher.compute_bitmask()
    if matcher.is_error():
        raise SchemaError(_explain(matcher.get_error()), param)
    return Grammar(kind, matcher, first_mask)


def _explain(error: str) -> str:
    unimplemented = re.search(r"Unimplemented keys: \[(.*?)\]", error)
    if unimplemented:
        keys = unimplemented.group(1).replace('"', "")
        return (f"JSON schema keyword(s) {keys} are not supported by constrained decoding: "
                "remove them, or set \"strict\": false to ignore them (the output is then not "
                "held to them)")
    if "too large" in error or "too complex" in error.lower():
        return (f"the JSON schema expands beyond the grammar limits ({error.strip()}): combined "
                "anyOf/allOf/oneOf branches multiply; simplify it")
    return f"the JSON schema cannot be compiled: {error.strip()}"


def _eos_ids(tokenizer) -> list[int]:
    """The tokenizer's EOS plus any EOS ids its model folder's generation_config.json lists."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    config = pathlib.Path(str(getattr(tokenizer, "name_or_path", ""))) / "generation_config.json"
    try:
        extra = json.loads(config.read_text(encoding="utf-8")).get("eos_token_id", [])
    except (OSError, ValueError):
        extra = []
    for token in extra if isinstance(extra, list) else [extra]:
        if isinstance(token, int) and token not in ids:
            ids.append(token)
    if not ids:
        raise SchemaError("the model's tokenizer has no EOS token, so a grammar cannot end "
                          "generation", "response_format")
    return ids
