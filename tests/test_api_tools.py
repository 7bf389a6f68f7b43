"""Tools, structured outputs, logprobs, n and penalties through the real server and the official
clients, on the demo model (random weights: its outputs are valid only because of the grammar)."""
from __future__ import annotations

import functools
import json
import operator

import jsonschema
import pytest
from pydantic import BaseModel, Field

pytest.importorskip("exo_lab.constrain", reason="the grammar engine (exo_lab/constrain.py) is not in this tree yet")

from fixtures_api import API_KEY, call, chat_body, client, server  # noqa: E402,F401 (fixtures)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def ask(client, messages, **extra):
    return client.chat.completions.create(model="demo", messages=messages,
                                          **{"max_tokens": 120, "temperature": 0.7, "seed": 3, **extra})


def valid_calls(calls):
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_round_trip(client, stream):
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    if stream:
        with client.chat.completions.stream(model="demo", messages=messages, tools=[WEATHER], tool_choice="required",
                                            max_tokens=120, temperature=0.7, seed=3) as events:
            reply = events.get_final_completion()
    else:
        reply = ask(client, messages, tools=[WEATHER], tool_choice="required")
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    valid_calls(choice.message.tool_calls)
    messages += [choice.message]          # as OpenAI's guide does: the message as it came, "refusal": null too
    messages += [{"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}
                 for call in choice.message.tool_calls]
    answer = ask(client, messages, tools=[WEATHER], tool_choice="none")
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason in ("stop", "length")


def test_named_tool_choice_and_no_parallel_calls(client):
    reply = ask(client, [{"role": "user", "content": "Paris"}], tools=[WEATHER], parallel_tool_calls=False,
                tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert len(reply.choices[0].message.tool_calls) == 1
    valid_calls(reply.choices[0].message.tool_calls)


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)


# Every string, array and number bounded, so the grammar must close the object within max_tokens=120:
# at most 62 bytes of keys and punctuation, 48 for the name's 12 characters (4 bytes each at most),
# and every token of the demo tokenizer is at least one byte.
BOUNDED = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                                          "maxItems": 3},
    "age": {"type": "integer", "minimum": 0, "maximum": 120}, "ok": {"type": "boolean"}},
    "required": ["name", "tags", "age", "ok"], "additionalProperties": False}


def test_response_format_json_schema_and_parse(client):
    for seed in range(4):
        reply = ask(client, [{"role": "user", "content": "Someone"}], seed=seed, response_format={
            "type": "json_schema", "json_schema": {"name": "bounded", "schema": BOUNDED, "strict": True}})
        assert reply.choices[0].finish_reason == "stop", (seed, reply.choices[0].message.content)
        jsonschema.validate(json.loads(reply.choices[0].message.content), BOUNDED)
    parsed = client.chat.completions.parse(model="demo", messages=[{"role": "user", "content": "Someone"}],
                                           response_format=Person, max_tokens=120, temperature=0.7, seed=1, n=2)
    assert len(parsed.choices) == 2
    for choice in parsed.choices:
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Person)


def test_a_reply_cut_by_max_tokens_says_length(client):
    """As OpenAI: a JSON reply that max_tokens cut ends with finish_reason "length" (its content
    is the unfinished text), and the client's parse raises LengthFinishReasonError."""
    import openai

    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(model="demo", messages=[{"role": "user", "content": "Someone"}],
                                      response_format=Person, max_tokens=3, seed=1)
    cut = ask(client, [{"role": "user", "content": "x"}], max_tokens=3, response_format={
        "type": "json_schema", "json_schema": {"name": "Person", "schema": Person.model_json_schema()}})
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3
    cut = ask(client, [{"role": "user", "content": "Paris"}], max_tokens=5, tools=[WEATHER], tool_choice="required")
    assert cut.choices[0].finish_reason == "length" and not cut.choices[0].message.tool_calls


def test_json_object_parses_whenever_it_finishes(client, cluster):
    """json_object bounds nothing: the random demo model, once inside a string, closes it only by
    chance (1 token in 1,447 is '"'), so most replies are cut ("length"). A reply that finishes
    must parse; with '"' and '}' favoured (logit_bias) replies do finish, and must parse."""
    quote, brace = (str(cluster.tokenizer.convert_tokens_to_ids(token)) for token in '"}')
    finished = 0
    for seed, bias in [(seed, bias) for seed in range(3) for bias in ({}, {quote: 6, brace: 6})]:
        reply = ask(client, [{"role": "user", "content": "x"}], seed=seed, logit_bias=bias,
                    response_format={"type": "json_object"})
        choice = reply.choices[0]
        if choice.finish_reason == "stop":
            finished += 1
            assert isinstance(json.loads(choice.message.content), dict), (seed, bias, choice.message.content)
        else:
            assert choice.finish_reason == "length" and reply.usage.completion_tokens == 120
    assert finished >= 1


def test_logprobs_n_and_penalties(client):
    reply = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                           temperature=0.8, seed=5, n=3, logprobs=True, top_logprobs=4,
                                           presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"5": -100})
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)
    for choice in reply.choices:
        for entry in choice.logprobs.content:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 4 and entry.bytes is not None
    chunks = list(client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, n=2, stream=True, logprobs=True))
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    completion = client.completions.create(model="demo", prompt="Once", max_tokens=4, logprobs=3, n=2)
    for choice in completion.choices:
        assert len(choice.logprobs.tokens) == len(choice.logprobs.text_offset) == len(choice.logprobs.top_logprobs)


def test_langchain_bind_tools_and_structured_output(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key=API_KEY, model="demo", max_tokens=120, temperature=0.7,
                     max_retries=0)
    bound = llm.bind_tools([WEATHER], tool_choice="required")
    for message in (bound.invoke("Weather?"), functools.reduce(operator.add, bound.stream("Weather?"))):
        assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
        jsonschema.validate(message.tool_calls[0]["args"], WEATHER["function"]["parameters"])
    assert isinstance(llm.with_structured_output(Person).invoke("Someone"), Person)
