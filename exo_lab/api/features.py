"""The request fields that shape decoding beyond temperature and top_p, validated one by one.

- ``n`` (1 .. the loaded model's max_batch): that many choices sharing one prefill
  (``Cluster.astream_n``; choice i is seeded seed + i);
- ``logprobs`` / ``top_logprobs`` (chat: on/off and 0..20 alternatives) and completions'
  ``logprobs`` (0..5 alternatives);
- ``presence_penalty`` / ``frequency_penalty`` in [-2, 2]; ``logit_bias``: at most 300 entries
  ``{"<token id>": bias in [-100, 100]}``;
- ``response_format`` (text, json_object, json_schema {name, schema, strict}) and ``tools`` /
  ``tool_choice`` / ``parallel_tool_calls``: decoded under a grammar (exo_lab.constrain), so the
  output always parses. The grammar compiles on the API's tokenizer thread, never on the loop.

Each refusal is a 400 naming the field (``param``) and what it may be.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from .errors import bad_request

MAX_CHAT_TOP_LOGPROBS = 20          # as OpenAI
MAX_COMPLETION_LOGPROBS = 5         # as OpenAI's legacy completions
MAX_PENALTY = 2.0                   # presence/frequency penalties lie in [-2, 2], as OpenAI
MAX_LOGIT_BIAS_ENTRIES = 300        # as the data plane's bound
MAX_LOGIT_BIAS = 100.0
MAX_TOOLS = 128                     # as OpenAI
MAX_SCHEMA_BYTES = 64 << 10         # one JSON schema (or one tool's parameters), serialized
MAX_DESCRIPTION_CHARS = 4096
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")     # OpenAI's rule for function and schema names
TOOL_CHOICES = ("none", "auto", "required")


@dataclass(frozen=True)
class Decoding:
    """What a request asks of decoding beyond SamplingParams' basics; all defaults mean "plain"."""

    n: int = 1
    logprobs: int | None = None          # None: none; k: the chosen token's logprob and k alternatives
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    response_format: dict | None = None  # {"type": "json_object"} | {"type": "json_schema", ...}; None: text
    tools: tuple[dict, ...] = ()         # chat's shape: {"type": "function", "function": {name, ...}}
    tool_choice: str | dict = "auto"     # "none" | "auto" | "required" | {"type": "function", ...}
    parallel_tool_calls: bool = True
    grammar: object = field(default=None, compare=False)   # the compiled Grammar, or None

    @property
    def calls_tools(self) -> bool:
        """Whether the output is parsed for tool calls (tools given and not tool_choice "none")."""
        return bool(self.tools) and self.tool_choice != "none"

    def sampling_fields(self) -> dict:
        """The SamplingParams fields this sets, only where they differ from the defaults (so a
        plain request builds the same SamplingParams as before)."""
        fields = {"presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                  "logit_bias": self.logit_bias}
        chosen = {name: value for name, value in fields.items() if value not in (None, 0.0, ())}
        if self.logprobs is not None:     # 0 is "the chosen token's logprob, no alternatives", not off
            chosen["logprobs"] = self.logprobs
        return chosen


# ---------------------------------------------------------------- sampling fields
def choice_count(body: dict, max_batch: int, param: str = "n") -> int:
    value = body.get(param)
    if value is None:
        return 1
    if not is_int(value):
        raise bad_request(f"'{param}' must be an integer, got {json_type(value)}", param=param)
    if not 1 <= value <= max_batch:
        raise bad_request(f"'{param}' must be between 1 and {max_batch} (the model is loaded with max_batch "
                          f"{max_batch}: choices are decoded together), got {value}", param=param)
    return value


def chat_logprobs(body: dict) -> int | None:
    """chat's ``logprobs`` (bool) and ``top_logprobs`` (0..20, needs logprobs) -> alternatives or None."""
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise bad_request(f"'logprobs' must be true or false, got {json_type(wanted)}", param="logprobs")
    top = body.get("top_logprobs")
    if top is None:
        return 0 if wanted else None
    if not is_int(top) or not 0 <= top <= MAX_CHAT_TOP_LOGPROBS:
        raise bad_request(f"'top_logprobs' must be an integer between 0 and {MAX_CHAT_TOP_LOGPROBS}, got "
                          f"{short_repr(top)}", param="top_logprobs")
    if not wanted:
        raise bad_request("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return top


def completion_logprobs(body: dict) -> int | None:
    value = body.get("logprobs")
    if value is None:
        return None
    if not is_int(value) or not 0 <= value <= MAX_COMPLETION_LOGPROBS:
        raise bad_request(f"'logprobs' must be an integer between 0 and {MAX_COMPLETION_LOGPROBS} (alternatives "
                          f"per token), got {short_repr(value)}", param="logprobs")
    return value


def penalty(body: dict, name: str) -> float:
    value = body.get(name)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -MAX_PENALTY <= value <= MAX_PENALTY:
        raise bad_request(f"'{name}' must be a number between -2 and 2, got {short_repr(value)}", param=name)
    return float(value)


def logit_bias(body: dict, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """``{"<token id>": bias}`` -> sorted ((id, bias), ...); ids in the vocabulary, bias in [-100, 100]."""
    value = body.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise bad_request("'logit_bias' must be an object like {\"1234\": -100}", param="logit_bias")
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise bad_request(f"'logit_bias' has {len(value)} entries; at most {MAX_LOGIT_BIAS_ENTRIES} are allowed",
                          param="logit_bias")
    entries = {}
    for key, bias in value.items():
        if not re.fullmatch(r"[0-9]{1,9}", key) or int(key) >= vocab_size:
            raise bad_request(f"'logit_bias' key {short_repr(key)} is not a token id of this model (a decimal "
                              f"string in [0, {vocab_size}))", param="logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise bad_request(f"'logit_bias' value for {key} must be a number between -100 and 100, got "
                              f"{short_repr(bias)}", param="logit_bias")
        entries[int(key)] = float(bias)
    return tuple(sorted(entries.items()))


# ---------------------------------------------------------------- response_format
def response_format(value, param: str = "response_format") -> dict | None:
    """None for text; else {"type": "json_object"} or {"type": "json_schema", "name", "schema", "strict"}."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise bad_request(f"'{param}' must be {{\"type\": \"text\" | \"json_object\" | \"json_schema\"}}",
                          param=param)
    kind = value["type"]
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise bad_request(f"'{param}.json_schema' must be an object {{name, schema, strict}}",
                              param=f"{param}.json_schema")
        return json_schema_format(spec, f"{param}.json_schema")
    extra = sorted(set(value) - {"type"})
    if extra:
        raise bad_request(f"'{param}.{extra[0]}' is not a field of a {kind} format", param=f"{param}.{extra[0]}")
    return None if kind == "text" else {"type": "json_object"}


def json_schema_format(spec: dict, param: str) -> dict:
    """A json_schema format's {name, schema, strict, description} checked (schema bounded in size)."""
    extra = sorted(set(spec) - {"name", "schema", "strict", "description", "type"})
    if extra:
        raise bad_request(f"'{param}.{extra[0]}' is not a field of a JSON schema format", param=f"{param}.{extra[0]}")
    name = spec.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise bad_request(f"'{param}.name' is required: 1 to 64 letters, digits, _ or -", param=f"{param}.name")
    schema = spec.get("schema", {})
    check_schema(schema, f"{param}.schema")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad_request(f"'{param}.strict' must be true or false", param=f"{param}.strict")
    description(spec, param)
    return {"type": "json_schema", "name": name, "schema": schema, "strict": bool(strict)}


def check_schema(schema, param: str) -> None:
    if not isinstance(schema, dict):
        raise bad_request(f"'{param}' must be a JSON schema object", param=param)
    size = len(json.dumps(schema))
    if size > MAX_SCHEMA_BYTES:
        raise bad_request(f"'{param}' is {size} bytes; a schema may take at most {MAX_SCHEMA_BYTES}", param=param)


def description(spec: dict, param: str) -> None:
    text = spec.get("description")
    if text is not None and (not isinstance(text, str) or len(text) > MAX_DESCRIPTION_CHARS):
        raise bad_request(f"'{param}.description' must be a string of at most {MAX_DESCRIPTION_CHARS} characters",
                          param=f"{param}.description")


# ---------------------------------------------------------------- tools
def tools(value, param: str = "tools") -> tuple[dict, ...]:
    """chat's ``tools`` -> ({"type": "function", "function": {name, description?, parameters, strict}}, ...)."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise bad_request(f"'{param}' must be a list of at most {MAX_TOOLS} function tools", param=param)
    checked, names = [], set()
    for index, tool in enumerate(value):
        where = f"{param}[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise bad_request(f"'{where}' must be {{\"type\": \"function\", \"function\": {{name, parameters}}}} "
                              "(only function tools are supported)", param=where)
        function = function_spec(tool["function"], f"{where}.function")
        if function["name"] in names:
            raise bad_request(f"'{where}.function.name' {function['name']!r} is given twice", param=f"{where}.function.name")
        names.add(function["name"])
        checked.append({"type": "function", "function": function})
    return tuple(checked)


def function_spec(spec: dict, param: str) -> dict:
    """One function's {name, description, parameters, strict}, checked; parameters default to {}."""
    extra = sorted(set(spec) - {"name", "description", "parameters", "strict"})
    if extra:
        raise bad_request(f"'{param}.{extra[0]}' is not a field of a function", param=f"{param}.{extra[0]}")
    name = spec.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise bad_request(f"'{param}.name' is required: 1 to 64 letters, digits, _ or -", param=f"{param}.name")
    parameters = spec.get("parameters")
    parameters = {"type": "object", "properties": {}} if parameters is None else parameters
    check_schema(parameters, f"{param}.parameters")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad_request(f"'{param}.strict' must be true or false", param=f"{param}.strict")
    description(spec, param)
    function = {"name": name, "parameters": parameters}
    if spec.get("description"):
        function["description"] = spec["description"]
    if strict is not None:
        function["strict"] = strict
    return function


def tool_choice(value, tool_list: tuple[dict, ...], param: str = "tool_choice") -> str | dict:
    """"none" | "auto" | "required" | {"type": "function", "function": {"name"}} (a tool given)."""
    if value is None:
        return "auto"
    if not tool_list:
        raise bad_request(f"'{param}' needs 'tools'", param=param)
    if value in TOOL_CHOICES:
        return value
    names = [tool["function"]["name"] for tool in tool_list]
    name = named_choice(value)
    if name not in names:
        raise bad_request(f"'{param}' must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", "
                          f"\"function\": {{\"name\": ...}}}} naming one of the tools ({', '.join(names)})",
                          param=param)
    return {"type": "function", "function": {"name": name}}


def named_choice(value) -> str | None:
    if isinstance(value, dict) and value.get("type") == "function":
        function = value.get("function")
        name = function.get("name") if isinstance(function, dict) else value.get("name")   # chat | responses
        return name if isinstance(name, str) else None
    return None


def parallel_tool_calls(body: dict) -> bool:
    value = body.get("parallel_tool_calls")
    if value is None:
        return True
    if not isinstance(value, bool):
        raise bad_request("'parallel_tool_calls' must be true or false", param="parallel_tool_calls")
    return value


def check_combination(fmt: dict | None, tool_list: tuple[dict, ...], choice, param: str = "response_format") -> None:
    if fmt is not None and tool_list and choice != "none":
        raise bad_request(f"'{param}' (a JSON output) and tools cannot be combined here: a reply is either "
                          "tool calls or JSON; send tool_choice \"none\" or leave one out", param=param)


# ---------------------------------------------------------------- grammar
def compile_grammar(decoding: Decoding, tokenizer):
    """The Grammar decoding is constrained by (or None); runs on the tokenizer thread (up to ~2 s).
    Raises ApiError 400 for a schema the grammar engine refuses."""
    if decoding.response_format is None and not decoding.tools:
        return None
    from .. import constrain

    try:
        if decoding.response_format is None:   # calls, or (tool_choice "none") text that writes none
            return constrain.tool_call_grammar(list(decoding.tools), decoding.tool_choice,
                                               decoding.parallel_tool_calls, tokenizer)
        if decoding.response_format["type"] == "json_object":
            return constrain.json_object_grammar(tokenizer)
        return constrain.compile_json_schema(decoding.response_format["schema"], tokenizer,
                                             strict=decoding.response_format["strict"])
    except constrain.SchemaError as exc:
        param = "tools" if decoding.response_format is None else "response_format"
        raise bad_request(f"{param}: {exc}", param=getattr(exc, "param", None) or param,
                          code="invalid_schema") from None


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def json_type(value) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                       (list, "an array"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


def short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
