"""Constrained decoding (exo_lab/constrain.py) on SmolLM2's real 49,152-token tokenizer: random
walks over the allowed tokens always give text that parses and validates; hostile schemas are
refused quickly with a message naming the problem.

Hostile cases and what each gets (a SchemaError, i.e. a 400, within COMPILE_TIMEOUT_S):

    case                 schema                                   message names
    deep nesting         100 nested objects                       "nests deeper than 32 levels"
    huge enum            an enum of 5,000 integers                "enum values ... at most 1024"
    many properties      2,000 properties                         "properties ... at most 1024"
    huge size            100 KB of descriptions                   "bytes; at most 65536"
    remote $ref          "$ref": "https://..."                    "points outside the schema"
    unsupported keyword  "not", "if"/"then", "uniqueItems"...     the keyword(s), strict: false
    unsatisfiable        minimum 5 > maximum 1                    "minimum (5) is greater"
    compile blow-up      allOf of 8 anyOf of 8 objects (8^8)      "beyond the grammar limits"
    not an object        a list                                   "must be an object"
"""
from __future__ import annotations

import dataclasses
import json
import random
import time

import jsonschema
import numpy as np
import pytest

from exo_lab import constrain, sampling
from exo_lab.constrain import EXAMPLE_SCHEMAS, SchemaError

WALKS = 50
MAX_STEPS = 400


@dataclasses.dataclass(frozen=True)
class StandInLogitRule:   # until exo_lab.sampling.LogitRule lands (same fields)
    allowed: bytes | None = None
    bias: tuple[tuple[int, float], ...] = ()


@pytest.fixture(autouse=True)
def logit_rule(monkeypatch):
    if not hasattr(sampling, "LogitRule"):
        monkeypatch.setattr(sampling, "LogitRule", StandInLogitRule, raising=False)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    from exo_lab.weights.smollm2 import smollm2_model_dir
    return AutoTokenizer.from_pretrained(str(smollm2_model_dir(progress=False)))


def allowed_ids(rule) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(rule.allowed, np.uint8), bitorder="little")
    return np.flatnonzero(bits)


def walk(grammar, tokenizer, rng: random.Random, prefix: str = "") -> str:
    """Decode by picking uniformly among the allowed tokens until the grammar is finished."""
    processor = grammar.processor()
    tokens = tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
    for token in tokens:
        processor.accept(token)
    eos = set(constrain._eos_ids(tokenizer))
    for _ in range(MAX_STEPS):
        if processor.finished():
            break
        token = int(rng.choice(allowed_ids(processor.next_rule())))
        processor.accept(token)
        if token not in eos:
            tokens.append(token)
    assert processor.finished(), f"not finished after {MAX_STEPS} tokens"
    assert set(allowed_ids(processor.next_rule())) <= eos   # only EOS once complete
    return tokenizer.decode(tokens)


@pytest.mark.parametrize("name", sorted(EXAMPLE_SCHEMAS))
def test_random_walks_parse_and_validate(name, tokenizer):
    schema = EXAMPLE_SCHEMAS[name]
    grammar = constrain.compile_json_schema(schema, tokenizer)
    rng = random.Random(name)
    for _ in range(WALKS):
        text = walk(grammar, tokenizer, rng)
        jsonschema.validate(json.loads(text), schema)


UNBOUNDED_NUMBERS = {"type": "object", "properties": {
    "x": {"type": "number"}, "n": {"type": "integer"}, "low": {"type": "number", "minimum": 5},
    "step": {"type": "number", "multipleOf": 0.5, "maximum": 10}, "maybe": {"type": ["number", "null"]}},
    "required": ["x", "n", "low", "step", "maybe"], "additionalProperties": False}


def digits_ok(value) -> bool:
    text = json.dumps(value)
    return abs(value) <= constrain.NUMBER_MAX_ABS and "e" not in text.lower() and \
        len(text.partition(".")[2]) <= constrain.NUMBER_FRACTION_DIGITS


def test_numbers_without_bounds_get_them_and_stay_valid(tokenizer):
    """llguidance's own number grammar has no length limit (without the bounds these walks write
    26-digit integers and exponents; a model can write digits until max_tokens). Bounded where the
    schema sets nothing, every walk validates against the schema as given, with at most
    NUMBER_FRACTION_DIGITS digits after the point and no exponent; the schema's own bounds
    (minimum 5, multipleOf 0.5) are kept."""
    grammar = constrain.compile_json_schema(UNBOUNDED_NUMBERS, tokenizer)
    rng = random.Random(7)
    for _ in range(20):
        value = json.loads(walk(grammar, tokenizer, rng))
        jsonschema.validate(value, UNBOUNDED_NUMBERS)
        assert all(digits_ok(v) for v in value.values() if v is not None), value
        assert value["low"] >= 5 and value["step"] % 0.5 == 0
    bounded = constrain.bound_numbers(UNBOUNDED_NUMBERS)
    assert bounded["properties"]["low"] == {"type": "number", "minimum": 5, "multipleOf": 1e-10,
                                            "maximum": constrain.NUMBER_MAX_ABS}
    assert bounded["properties"]["step"] == {"type": "number", "multipleOf": 0.5, "maximum": 10,
                                             "minimum": -constrain.NUMBER_MAX_ABS}
    assert constrain.bound_numbers({"const": {"type": "number"}}) == {"const": {"type": "number"}}


def test_json_object_and_cache(tokenizer):
    grammar = constrain.json_object_grammar(tokenizer)
    assert constrain.json_object_grammar(tokenizer) is grammar
    assert constrain.compile_json_schema(dict(EXAMPLE_SCHEMAS["enums"]), tokenizer) is \
        constrain.compile_json_schema(EXAMPLE_SCHEMAS["enums"], tokenizer)
    processor = grammar.processor()
    # A uniform walk over an open-ended object rarely closes it: check the mask's edges instead.
    assert all(tokenizer.decode([t]).startswith("{") for t in allowed_ids(processor.next_rule()))
    for token in tokenizer.encode('{"a": [1, {"b": null}]}', add_special_tokens=False):
        processor.accept(token)
    assert processor.finished()


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 15},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": -100, "maximum": 100},
        "b": {"type": "integer", "minimum": -100, "maximum": 100}},
        "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}


@pytest.mark.parametrize("tool_choice, parallel", [
    ("required", True), ("required", False),
    ({"type": "function", "function": {"name": "add"}}, True), ("auto", True)])
def test_tool_call_walks_parse_and_validate(tool_choice, parallel, tokenizer):
    grammar = constrain.tool_call_grammar(TOOLS, tool_choice, parallel, tokenizer)
    rng = random.Random(str(tool_choice))
    # Under "auto" a uniform walk writes free text for ever; start it on a call instead.
    prefix = constrain.TOOL_CALL_OPEN if tool_choice == "auto" else ""
    for _ in range(20):
        content, calls = constrain.parse_tool_calls(walk(grammar, tokenizer, rng, prefix))
        assert content is None and calls
        assert parallel or len(calls) == 1
        for call in calls:
            if isinstance(tool_choice, dict):
                assert call["name"] == "add"
            jsonschema.validate(json.loads(call["arguments"]), PARAMETERS[call["name"]])


def test_auto_allows_plain_text_and_none_forbids_calls(tokenizer):
    auto = constrain.tool_call_grammar(TOOLS, "auto", True, tokenizer).processor()
    for token in tokenizer.encode("It is sunny.", add_special_tokens=False):
        auto.accept(token)
    assert 2 in allowed_ids(auto.next_rule())     # EOS may end plain text
    none = constrain.tool_call_grammar(TOOLS, "none", True, tokenizer).processor()
    for token in tokenizer.encode("<tool_call", add_special_tokens=False):
        none.accept(token)
    assert tokenizer.encode(">", add_special_tokens=False)[0] not in allowed_ids(none.next_rule())


def test_parse_tool_calls_and_prompt():
    text = ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "a}</tool_call>\\"{", "unit": "c"}}</tool_call>')
    content, calls = constrain.parse_tool_calls(text)
    assert content is None
    assert calls == [{"name": "add", "arguments": '{"a": 1, "b": 2}', "complete": True},
                     {"name": "get_weather", "arguments": '{"city": "a}</tool_call>\\"{", "unit": "c"}',
                      "complete": True}]
    assert constrain.parse_tool_calls("plain <tool_call>") == ("plain <tool_call>", [])
    assert constrain.parse_tool_calls("<tool_weather>x") == ("<tool_weather>x", [])
    prompt = constrain.tool_prompt(TOOLS)
    assert '"name": "get_weather"' in prompt and constrain.TOOL_CALL_OPEN in prompt


@pytest.mark.parametrize("seed", range(3))
def test_reader_fed_in_any_pieces_equals_reader_fed_whole(seed, tokenizer):
    """Streamed deltas: however the text is cut, the events joined give the same calls, and the
    arguments pieces are the arguments as written (the walks' own text, byte for byte)."""
    grammar = constrain.tool_call_grammar(TOOLS, "required", True, tokenizer)
    rng = random.Random(seed)
    text = walk(grammar, tokenizer, rng, "")
    whole = constrain.parse_tool_calls(text)
    cuts = sorted(rng.sample(range(1, len(text)), min(12, len(text) - 1)))
    reader, events = constrain.ToolCallReader(), []
    for start, end in zip([0] + cuts, cuts + [len(text)]):
        events += reader.feed(text[start:end])
    assert reader.result() == whole
    names = [event[2] for event in events if event[0] == "call"]
    arguments = ["".join(e[2] for e in events if e[0] == "arguments" and e[1] == index) for index in range(len(names))]
    assert [{"name": n, "arguments": a, "complete": True} for n, a in zip(names, arguments)] == whole[1]
    written = constrain.TOOL_CALL_SEPARATOR.join(
        f'{constrain.TOOL_CALL_OPEN}{{"name": "{c["name"]}", "arguments": {c["arguments"]}}}{constrain.TOOL_CALL_CLOSE}'
        for c in whole[1])
    assert written == text


def test_a_cut_call_keeps_its_arguments_so_far_and_a_cut_name_is_dropped():
    content, calls = constrain.parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 1, "b"')
    assert content is None and calls == [{"name": "add", "arguments": '{"a": 1, "b"', "complete": False}]
    assert constrain.parse_tool_calls('<tool_call>{"name": "ad') == (None, [])
    assert constrain.parse_tool_calls('<tool_ca') == ("<tool_ca", [])      # ended on its own: text
    reader = constrain.ToolCallReader()
    assert reader.feed("<tool_ca") == [] and reader.close(cut=True) == [] and reader.result() == (None, [])


def nested(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


HOSTILE = {
    "deep nesting": (nested(100), "nests deeper than 32"),
    "huge enum": ({"enum": list(range(5000))}, "enum values"),
    "many properties": ({"type": "object", "properties": {
        f"p{i}": {"type": "integer"} for i in range(2000)}}, "properties values"),
    "huge size": ({"type": "string", "description": "x" * 100_000}, "at most 65536"),
    "remote ref": ({"$ref": "https://example.com/schema.json"}, "points outside the schema"),
    "not": ({"not": {"type": "string"}}, "keyword(s) not are not supported"),
    "if/then": ({"if": {"type": "string"}, "then": {"minLength": 2}}, "if, then"),
    "uniqueItems": ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    "unsatisfiable": ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum (5) is greater"),
    "compile blow-up": ({"allOf": [{"anyOf": [
        {"type": "object", "properties": {f"a{j}_{i}": {"type": "integer"}},
         "required": [f"a{j}_{i}"]} for i in range(8)]} for j in range(8)]},
        "beyond the grammar limits"),
    "not an object": ([{"type": "string"}], "must be an object"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_schemas_are_refused_quickly(case, tokenizer):
    schema, message = HOSTILE[case]
    start = time.perf_counter()
    with pytest.raises(SchemaError, match=".*" + message.replace("(", r"\(").replace(")", r"\)")) \
            as caught:
        constrain.compile_json_schema(schema, tokenizer)
    assert time.perf_counter() - start < constrain.COMPILE_TIMEOUT_S
    assert caught.value.param == "response_format"


def test_strict_false_ignores_unsupported_keywords(tokenizer):
    grammar = constrain.compile_json_schema(
        {"type": "array", "items": {"type": "integer"}, "uniqueItems": True, "maxItems": 3},
        tokenizer, strict=False)
    assert isinstance(json.loads(walk(grammar, tokenizer, random.Random(0))), list)


@pytest.mark.parametrize("tools, tool_choice, param, message", [
    ([], "auto", "tools", "non-empty list"),
    ([{"type": "function", "function": {"name": "bad name"}}], "auto", "tools", "1-64 letters"),
    ([WEATHER, WEATHER], "auto", "tools", "defined twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": nested(100)}}], "auto",
     "tools", "nests deeper"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice", "not in tools"),
    (TOOLS, "sometimes", "tool_choice", "must be"),
])
def test_bad_tools_are_refused(tools, tool_choice, param, message, tokenizer):
    with pytest.raises(SchemaError, match=message) as caught:
        constrain.tool_call_grammar(tools, tool_choice, True, tokenizer)
    assert caught.value.param == param


def test_masked_token_is_a_violation(tokenizer):
    processor = constrain.compile_json_schema(EXAMPLE_SCHEMAS["enums"], tokenizer).processor()
    with pytest.raises(constrain.GrammarViolation):
        processor.accept(tokenizer.encode("hello", add_special_tokens=False)[0])
