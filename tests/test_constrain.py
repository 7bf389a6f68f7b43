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
    text = ('Let me check.\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n'
            '<tool_call>not json</tool_call>')
    content, calls = constrain.parse_tool_calls(text)
    assert calls == [{"name": "add", "arguments": '{"a": 1, "b": 2}'}]
    assert content == "Let me check.\n\n<tool_call>not json</tool_call>"
    assert constrain.parse_tool_calls("plain") == ("plain", [])
    prompt = constrain.tool_prompt(TOOLS)
    assert '"name": "get_weather"' in prompt and constrain.TOOL_CALL_OPEN in prompt


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
