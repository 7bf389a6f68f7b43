"""The API applications call (issue 23) through the real server, the official openai client and
LangChain, on one cluster for the whole module. The demo model's random weights give valid JSON
and tool calls only because decoding is constrained: that is the point.

- tools (round trips, streamed and not, named and parallel; streamed calls arrive as written;
  a call cut by max_tokens is the whole call's beginning), structured outputs (json_schema,
  json_object, chat.completions.parse, cut by max_tokens), logprobs, n and penalties;
- /v1/responses: create (stream and not), parse, function calls;
- /v1/embeddings: against transformers' own final hidden states; base64, dimensions, token ids,
  LangChain's OpenAIEmbeddings.
"""
from __future__ import annotations

import base64
import functools
import json
import operator

import jsonschema
import numpy as np
import pytest
from pydantic import BaseModel, Field

from fixtures_api import API_KEY, client, server  # noqa: F401 (fixtures)

# ---------------------------------------------------------------- tools and structured outputs
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
                                            parallel_tool_calls=False, max_tokens=120, temperature=0.7,
                                            seed=3) as events:
            reply = events.get_final_completion()
    else:       # one call: the random model may start a second call that max_tokens cuts
        reply = ask(client, messages, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    valid_calls(choice.message.tool_calls)
    messages += [choice.message]          # as OpenAI's guide does: the message as it came, "refusal": null too
    messages += [{"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}
                 for call in choice.message.tool_calls]
    answer = ask(client, messages, tools=[WEATHER], tool_choice="none")
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].finish_reason in ("stop", "length")


def test_fallback_writes_calls_as_the_grammar_does_and_results_in_words():
    from exo_lab.api.tools import fallback_messages

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"t": 21}'},
                {"role": "tool", "tool_call_id": "call_unknown", "content": "late"}]
    out = fallback_messages(messages, (WEATHER,))
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("You may call functions") and out[0]["content"].endswith("Be brief.")
    assert out[2]["content"] == '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}</tool_call>'
    assert out[3]["content"] == 'Function results:\nget_weather returned: {"t": 21}\na function returned: late'


def test_tool_choice_none_is_text_that_cannot_write_a_call(cluster):
    """OpenAI's "none": no calls, and here no call-shaped text either (a small model given the
    tool prompt copies it): the reply is decoded under the grammar's text rule."""
    from exo_lab.api import features

    tools = features.tools([WEATHER])
    assert features.compile_grammar(features.Decoding(), cluster.tokenizer) is None
    grammar = features.compile_grammar(features.Decoding(tools=tools, tool_choice="none"), cluster.tokenizer)
    processor = grammar.processor()
    for token in cluster.tokenizer.encode("<tool_call", add_special_tokens=False):
        processor.next_rule()
        processor.accept(token)
    bits = np.unpackbits(np.frombuffer(processor.next_rule().allowed, np.uint8), bitorder="little")
    assert not bits[cluster.tokenizer.convert_tokens_to_ids(">")] and bits.sum() > 1000


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
    assert cut.choices[0].message.content is None          # no raw "<tool_call>" text


def test_a_call_cut_in_its_arguments_is_a_prefix_of_the_whole_call(client):
    """Seeded, the cut reply is the whole reply's beginning: its call carries the arguments
    written so far (finish_reason "length", as OpenAI), never the call's raw text as content."""
    named = dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = ask(client, [{"role": "user", "content": "Paris"}], **named).choices[0]
    assert whole.finish_reason == "tool_calls"
    arguments = whole.message.tool_calls[0].function.arguments
    used = ask(client, [{"role": "user", "content": "Paris"}], **named).usage.completion_tokens
    for tokens in range(used - 4, 0, -2):       # the last few tokens close the call
        cut = ask(client, [{"role": "user", "content": "Paris"}], max_tokens=tokens, **named).choices[0]
        assert cut.finish_reason == "length" and cut.message.content is None, tokens
        if cut.message.tool_calls:
            partial = cut.message.tool_calls[0].function.arguments
            assert cut.message.tool_calls[0].function.name == "get_weather"
            assert arguments.startswith(partial), (partial, arguments)
            if partial != arguments:
                return
    raise AssertionError(f"no cut of {used} tokens kept a call")


def test_streamed_calls_arrive_as_written(client):
    """The stream carries each call's id, type and name first, then its arguments in the pieces
    the model wrote (one per token that added to them), and they join to the unstreamed reply's."""
    settings = dict(model="demo", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER],
                    tool_choice="required", max_tokens=120, temperature=0.7, seed=5)
    whole = client.chat.completions.create(**settings).choices[0]
    deltas = [chunk.choices[0].delta for chunk in client.chat.completions.create(stream=True, **settings)
              if chunk.choices and chunk.choices[0].delta.tool_calls]
    heads = [delta.tool_calls[0] for delta in deltas if delta.tool_calls[0].id]
    assert [(head.index, head.function.name, head.type) for head in heads] == \
        [(index, call.function.name, "function") for index, call in enumerate(whole.message.tool_calls)]
    for index, call in enumerate(whole.message.tool_calls):
        pieces = [d.tool_calls[0].function.arguments for d in deltas
                  if d.tool_calls[0].index == index and not d.tool_calls[0].id]
        assert len(pieces) > 3 and "".join(pieces) == call.function.arguments


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
    # logprobs without alternatives (chat: logprobs alone; completions: logprobs=0) still gives each token's
    plain = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                           logprobs=True).choices[0]
    assert len(plain.logprobs.content) == 3 and all(e.top_logprobs == [] and e.logprob <= 0 for e in plain.logprobs.content)
    zero = client.completions.create(model="demo", prompt="Once", max_tokens=3, logprobs=0).choices[0]
    assert len(zero.logprobs.token_logprobs) == 3 and all(v <= 0 for v in zero.logprobs.token_logprobs)


def test_langchain_bind_tools_and_structured_output(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key=API_KEY, model="demo", max_tokens=120, temperature=0.7,
                     max_retries=0)
    bound = llm.bind_tools([WEATHER], tool_choice="required")
    for message in (bound.invoke("Weather?"), functools.reduce(operator.add, bound.stream("Weather?"))):
        assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"
        jsonschema.validate(message.tool_calls[0]["args"], WEATHER["function"]["parameters"])
    assert isinstance(llm.with_structured_output(Person).invoke("Someone"), Person)


# ---------------------------------------------------------------- /v1/responses
# Bounded integers: one call is at most ~70 bytes, so the grammar must finish it within 100 tokens
# (unbounded ones let the random demo model write digits until max_output_tokens cuts the call).
NUMBER = {"type": "integer", "minimum": -100, "maximum": 100}
SMALL = {"type": "object", "properties": {"n": NUMBER}, "required": ["n"], "additionalProperties": False}
TOOL = {"type": "function", "name": "add", "strict": True, "parameters": {
    "type": "object", "properties": {"a": NUMBER, "b": NUMBER}, "required": ["a", "b"],
    "additionalProperties": False}}


def test_create_and_stream_text(client):
    response = client.responses.create(model="demo", input="Hello", instructions="Be brief.", max_output_tokens=6)
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status in ("completed", "incomplete") and response.output[0].type == "message"
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    with client.responses.stream(model="demo", input="Hello", max_output_tokens=6, extra_body={"seed": 0}) as stream:
        events = list(stream)
    kinds = [event.type for event in events]
    # seeded, the random demo model does not end within 6 tokens: cut, it ends as OpenAI's, response.incomplete
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.incomplete"
    final = events[-1].response
    assert final.id.startswith("resp_") and final.status == "incomplete"
    assert final.incomplete_details.reason == "max_output_tokens" and final.output[0].id.startswith("msg_")
    assert final.output_text == "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert final.usage.output_tokens == 6
    # a bounded JSON answer must end within 40 tokens: response.completed, read by get_final_response
    with client.responses.stream(model="demo", input="Hello", max_output_tokens=40, text={"format": {
            "type": "json_schema", "name": "n", "strict": True, "schema": SMALL}}) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[-1] == "response.completed" and final.status == "completed"
    jsonschema.validate(json.loads(final.output_text), SMALL)


def test_a_cut_function_call_is_incomplete(client):
    response = client.responses.create(model="demo", input="2+3?", tools=[TOOL], tool_choice="required",
                                       max_output_tokens=5)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert [item.type for item in response.output] == ["message"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_function_call_round_trip(client, stream, seed):
    ask = dict(model="demo", tools=[TOOL], tool_choice="required", parallel_tool_calls=False,
               max_output_tokens=100, temperature=0.7, extra_body={"seed": seed})
    if stream:
        with client.responses.stream(input="2+3?", **ask) as events:
            response = events.get_final_response()
    else:
        response = client.responses.create(input="2+3?", **ask)
    assert response.status == "completed" and [item.type for item in response.output] == ["function_call"]
    call = response.output[0]
    assert call.id.startswith("fc_") and call.call_id.startswith("call_") and call.name == "add"
    jsonschema.validate(json.loads(call.arguments), TOOL["parameters"])
    follow = [{"role": "user", "content": "2+3?"}, call.model_dump(exclude_none=True),
              {"type": "function_call_output", "call_id": call.call_id, "output": "5"}]
    answer = client.responses.create(model="demo", input=follow, tools=[TOOL], tool_choice="none",
                                     max_output_tokens=6)
    assert [item.type for item in answer.output] == ["message"] and answer.output[0].id.startswith("msg_")
    assert answer.output_text and answer.status in ("completed", "incomplete")


def test_streamed_function_call_events_arrive_as_written(client):
    """The call's item (name, call_id) is added once its name is whole, then its arguments come
    as deltas (one per token that added to them) joining to the final item's arguments."""
    events = list(client.responses.create(model="demo", input="2+3?", tools=[TOOL], tool_choice="required",
                                          parallel_tool_calls=False, max_output_tokens=100, temperature=0.7,
                                          extra_body={"seed": 0}, stream=True))
    kinds = [event.type for event in events]
    added = kinds.index("response.output_item.added")
    assert events[added].item.type == "function_call" and events[added].item.name == "add"
    deltas = [event.delta for event in events if event.type == "response.function_call_arguments.delta"]
    done = events[kinds.index("response.output_item.done")].item
    assert len(deltas) > 3 and "".join(deltas) == done.arguments and done.call_id == events[added].item.call_id
    assert added < kinds.index("response.function_call_arguments.delta") < kinds.index(
        "response.function_call_arguments.done") and kinds[-1] == "response.completed"
    jsonschema.validate(json.loads(done.arguments), TOOL["parameters"])


def test_parse_with_a_pydantic_model(client):
    from pydantic import BaseModel, Field

    class Sum(BaseModel):
        total: int = Field(ge=0, le=100)

    parsed = client.responses.parse(model="demo", input="2+3", text_format=Sum, max_output_tokens=40,
                                    temperature=0.7)
    assert isinstance(parsed.output_parsed, Sum)


# ---------------------------------------------------------------- /v1/embeddings
TEXTS = ["The cat sat on the mat.", "Pipelines split layers over PCs."]


@pytest.fixture(scope="module")
def reference(cluster):
    """(last, mean) pooled final hidden states of TEXTS, computed by transformers itself."""
    if not hasattr(cluster, "aembed"):
        pytest.skip("Cluster.aembed (the data plane's part) is not in this tree yet")
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(cluster.pipeline.model_dir), torch_dtype=torch.float32)
    out = {"last": [], "mean": []}
    for text in TEXTS:
        ids = torch.tensor([cluster.encode(text)])
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states[-1][0]   # (T, hidden), after the norm
        for pooling, vector in (("last", hidden[-1]), ("mean", hidden.mean(0))):
            out[pooling].append((vector / vector.norm()).numpy())
    return out


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_vectors_equal_transformers(client, reference, pooling):
    reply = client.embeddings.create(model="demo", input=TEXTS, extra_body={"pooling": pooling})
    assert reply.usage.prompt_tokens > 0 and [d.index for d in reply.data] == [0, 1]
    for data, expected in zip(reply.data, reference[pooling]):
        assert float(np.dot(data.embedding, expected)) >= 0.9999


def test_base64_dimensions_and_token_inputs(client, cluster, reference):
    floats = client.embeddings.create(model="demo", input=TEXTS[0], encoding_format="float").data[0].embedding
    raw = client.with_raw_response.embeddings.create(model="demo", input=TEXTS[0], encoding_format="base64")
    encoded = raw.http_response.json()["data"][0]["embedding"]
    assert np.allclose(np.frombuffer(base64.b64decode(encoded), "<f4"), floats)
    ids = client.embeddings.create(model="demo", input=[cluster.encode(TEXTS[0])]).data[0].embedding
    assert np.allclose(ids, floats, atol=1e-6)
    cut = client.embeddings.create(model="demo", input=TEXTS[0], dimensions=16).data[0].embedding
    expected = np.asarray(floats[:16]) / np.linalg.norm(floats[:16])
    assert len(cut) == 16 and np.allclose(cut, expected, atol=1e-5)


def test_langchain_openai_embeddings(server, reference):
    # check_embedding_ctx_length=False: otherwise LangChain counts tokens with tiktoken, which must
    # download its files (no network here) and knows nothing of this model's tokenizer anyway.
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(base_url=server.url + "/v1", api_key=API_KEY, model="demo",
                                  check_embedding_ctx_length=False, max_retries=0)
    vectors = embeddings.embed_documents(TEXTS)
    assert float(np.dot(vectors[1], reference["last"][1])) >= 0.9999
    assert float(np.dot(embeddings.embed_query(TEXTS[0]), reference["last"][0])) >= 0.9999
