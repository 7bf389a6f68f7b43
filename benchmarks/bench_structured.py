"""Structured outputs and tool calls with the real SmolLM2, as applications call them.

Starts ``exo_lab.Cluster.local(engines=2, max_cores=1)`` with SmolLM2 (two pipeline stages) and
serves the OpenAI API from it on 127.0.0.1, then:

1. **valid** -- for each of five Pydantic models (nested objects, enums, arrays, bounded numbers,
   required and optional fields: the shapes of :data:`exo_lab.constrain.EXAMPLE_SCHEMAS`),
   ``--prompts`` different prompts (8 at a time, temperature 0.8, seeded) through the official
   openai client's ``chat.completions.parse``. Valid: ``message.parsed`` is the model and the text
   validates with jsonschema against the schema the client sent. Target 100%.
2. **tools** -- tool-call round trips (tools -> tool_calls -> tool result -> answer), streamed and
   not, through the official client and LangChain's ``bind_tools``; LangChain's
   ``with_structured_output``. Prints each call and answer.
3. **speed** -- per-token time with a JSON schema against unconstrained, same prompts, at batch 1
   and 8 (median gap between streamed tokens while every request of the batch decodes;
   target <= 1.1x), through ``cluster.astream``.

Prints a table per phase.

    python benchmarks/bench_structured.py [--prompts 200] [--tokens 160] [--phases valid,tools,speed]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import json
import statistics
import time
from typing import Annotated, Literal

import jsonschema
from pydantic import BaseModel, Field

import exo_lab
from exo_lab import constrain
from exo_lab.constrain import EXAMPLE_SCHEMAS
from exo_lab.sampling import SamplingParams

BATCH = 8
API_KEY = "sk-bench-structured"
TOPICS = ("a customer", "a city", "a bug report", "the weather", "a sensor", "a book", "an order",
          "a planet", "a train", "a recipe")


# ---------------------------------------------------------------- the five models
class Geo(BaseModel):
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)


class Address(BaseModel):
    city: str = Field(max_length=20)
    geo: Geo


class NestedObjects(BaseModel):
    name: str = Field(max_length=20)
    address: Address


class Enums(BaseModel):
    status: Literal["open", "closed", "pending", "won't fix"]
    priority: Literal[1, 2, 3]
    flag: bool | None


class Arrays(BaseModel):
    tags: list[Annotated[str, Field(max_length=12)]] = Field(min_length=1, max_length=4)
    scores: list[Annotated[int, Field(ge=0, le=100)]] = Field(min_length=2, max_length=5)


class BoundedNumbers(BaseModel):
    celsius: float = Field(ge=-50, le=60)
    count: int = Field(ge=0, le=1000)
    ratio: float = Field(gt=0, le=1)


class RequiredFields(BaseModel):
    id: int = Field(ge=1, le=99999)
    email: str = Field(max_length=30)
    nickname: str | None = Field(max_length=12)
    verified: bool | None


MODELS = {"nested_objects": NestedObjects, "enums": Enums, "arrays": Arrays,
          "bounded_numbers": BoundedNumbers, "required_fields": RequiredFields}


# ---------------------------------------------------------------- 1. valid rate
def sent_schema(model: type[BaseModel]) -> dict:
    """The JSON schema the openai client sends for ``model`` (strict: every field required)."""
    from openai.lib._pydantic import to_strict_json_schema
    return to_strict_json_schema(model)


def parse_one(client, name: str, model: type[BaseModel], index: int, tokens: int) -> tuple[bool, str]:
    import openai
    schema = sent_schema(model)
    messages = [{"role": "system", "content": "Answer with one JSON object that matches this JSON "
                                              "schema: " + json.dumps(schema)},
                {"role": "user", "content": f"Example {index}: describe {TOPICS[index % len(TOPICS)]}."}]
    try:
        reply = client.chat.completions.parse(model="smollm2", messages=messages, response_format=model,
                                              max_tokens=tokens, temperature=0.8, seed=index)
    except (openai.LengthFinishReasonError, openai.ContentFilterFinishReasonError) as exc:
        return False, f"{name} #{index}: {type(exc).__name__}: {str(exc)[:100]}"
    except Exception as exc:   # a pydantic ValidationError or an HTTP error: counted as invalid
        return False, f"{name} #{index}: {type(exc).__name__}: {str(exc)[:160]}"
    message = reply.choices[0].message
    try:
        jsonschema.validate(json.loads(message.content), schema)
    except (ValueError, jsonschema.ValidationError) as exc:
        return False, f"{name} #{index}: {message.content[-60:]!r}: {str(exc)[:80]}"
    if not isinstance(message.parsed, model):
        return False, f"{name} #{index}: parsed is {message.parsed!r}"
    return True, ""


def valid_phase(client, prompts: int, tokens: int) -> None:
    print(f"{'schema':16s} {'valid':>15s} {'s':>7s}")
    failures = []
    with concurrent.futures.ThreadPoolExecutor(BATCH) as pool:
        for name, model in MODELS.items():
            started = time.perf_counter()
            results = list(pool.map(lambda i: parse_one(client, name, model, i, tokens), range(prompts)))
            valid = sum(ok for ok, _ in results)
            failures += [why for ok, why in results if not ok]
            print(f"{name:16s} {valid:5d}/{prompts:<5d} ({100 * valid / prompts:5.1f}%) "
                  f"{time.perf_counter() - started:7.1f}", flush=True)
    for failure in failures[:20]:
        print("  invalid:", failure)


# ---------------------------------------------------------------- 2. tool calls
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city, e.g. Paris"},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
QUESTION = "What is the weather in Paris right now? Use the tool."


def weather(city: str, unit: str) -> str:
    return json.dumps({"city": city, "temperature": 21 if unit == "celsius" else 70, "unit": unit,
                       "sky": "sunny"})


def client_round_trip(client, stream: bool, tool_choice: str, parallel: bool) -> None:
    import openai
    messages = [{"role": "user", "content": QUESTION}]
    settings = dict(model="smollm2", tools=[WEATHER], max_tokens=120, temperature=0.0)
    if stream:
        with client.chat.completions.stream(messages=messages, tool_choice=tool_choice,
                                            parallel_tool_calls=parallel, stream_options={"include_usage": True},
                                            **settings) as events:
            deltas = sum(1 for event in events if event.type == "tool_calls.function.arguments.delta")
            try:
                reply = events.get_final_completion()
            except openai.LengthFinishReasonError as exc:    # the helper raises on "length"
                reply = exc.completion
    else:
        reply, deltas = client.chat.completions.create(messages=messages, tool_choice=tool_choice,
                                                       parallel_tool_calls=parallel, **settings), 0
    choice = reply.choices[0]
    calls = choice.message.tool_calls or []
    label = f"openai {'stream' if stream else 'create'} {tool_choice} parallel={parallel}"
    print(f"{label:42s} finish={choice.finish_reason:10s} tokens={reply.usage.completion_tokens if reply.usage else '-':>3} calls="
          + ", ".join(f"{c.function.name}({c.function.arguments})" for c in calls)
          + (f" [{deltas} argument deltas]" if stream else "")
          + ("" if calls else f" content={choice.message.content!r}"))
    if not calls:
        return
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    messages.append(choice.message)
    messages += [{"role": "tool", "tool_call_id": c.id, "content": weather(**json.loads(c.function.arguments))}
                 for c in calls]
    for then in ("auto", "none"):     # "none": the answer must be text
        answer = client.chat.completions.create(messages=messages, tool_choice=then, **settings).choices[0]
        again = ", ".join(f"{c.function.name}({c.function.arguments})" for c in answer.message.tool_calls or [])
        print(f"{'':42s} then {then}: finish={answer.finish_reason} "
              + (f"calls again: {again}" if again else f"answer: {answer.message.content!r}"))


def langchain_round_trip(url: str) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """Get the current weather in a city."""
        return weather(city, unit)

    llm = ChatOpenAI(base_url=url + "/v1", api_key=API_KEY, model="smollm2", max_tokens=120,
                     temperature=0.0, max_retries=0)
    bound = llm.bind_tools([get_weather], tool_choice="required")
    for how in ("invoke", "stream"):
        question = [HumanMessage(QUESTION)]
        if how == "invoke":
            message = bound.invoke(question)
        else:
            chunks = list(bound.stream(question))
            message = chunks[0]
            for chunk in chunks[1:]:
                message += chunk
        print(f"{'langchain bind_tools ' + how:42s} calls={message.tool_calls}")
        results = [ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])
                   for call in message.tool_calls]
        answer = llm.bind_tools([get_weather], tool_choice="none").invoke(question + [message] + results)
        print(f"{'':42s} then none: answer: {answer.content!r}")
    person = llm.with_structured_output(RequiredFields).invoke("Make up a user account.")
    print(f"{'langchain with_structured_output':42s} {person!r}")


def tools_phase(client, url: str) -> None:
    for stream in (False, True):
        for tool_choice, parallel in (("auto", True), ("required", True), ("required", False)):
            client_round_trip(client, stream, tool_choice, parallel)
    langchain_round_trip(url)


# ---------------------------------------------------------------- 3. per-token time
def prompt_ids(cluster, schema: dict, index: int) -> list[int]:
    return cluster.encode_chat([
        {"role": "system", "content": "Answer with one JSON object that matches this JSON schema: "
                                      + json.dumps(schema)},
        {"role": "user", "content": f"Example {index}: describe {TOPICS[index % len(TOPICS)]}."}])


async def one(cluster, ids, params, processor) -> list[float]:
    return [time.perf_counter() async for _ in cluster.astream(ids, params, processor=processor)]


async def _gather(coroutines):
    return await asyncio.gather(*coroutines)


def stream_stamps(cluster, batch: int, schema: dict, constrained: bool, tokens: int) -> list[list[float]]:
    """When each token of ``batch`` concurrent requests arrived: the same prompts (the schema in
    the system prompt either way), with the schema's grammar or without (ignore_eos: it decodes
    ``tokens`` tokens)."""
    grammar = constrain.compile_json_schema(schema, cluster.tokenizer) if constrained else None
    runs = [one(cluster, prompt_ids(cluster, schema, i),
                SamplingParams(max_new_tokens=tokens, temperature=0.8, seed=i, ignore_eos=not constrained),
                grammar.processor() if grammar else None) for i in range(batch)]
    return cluster.run_coroutine(_gather(runs))


def decode_gaps_ms(runs: list[list[float]], end: int) -> list[float]:
    """Gaps between consecutive tokens of each stream while every stream of the batch decodes:
    after the last one's first token (before, prompt chunks alternate with decode steps) and
    before any stream's ``end``-th token."""
    start = max(stamps[0] for stamps in runs)
    return [(b - a) * 1e3 for stamps in runs for a, b in zip(stamps[:end], stamps[1:end]) if a >= start]


def per_token_ms(cluster, batch: int, schema: dict, tokens: int) -> tuple[float, float]:
    """(constrained, unconstrained) median gap between tokens of ``batch`` requests decoding
    together, over the same stretch: until the shortest constrained answer ends (a grammar ends
    its answer early; past that, fewer rows per step would flatter the constrained run)."""
    constrained = stream_stamps(cluster, batch, schema, True, tokens)
    free = stream_stamps(cluster, batch, schema, False, tokens)
    end = min(len(stamps) for stamps in constrained)
    gaps = decode_gaps_ms(constrained, end), decode_gaps_ms(free, end)
    return tuple(statistics.median(g) if g else float("nan") for g in gaps)


def speed_phase(cluster, tokens: int) -> None:
    print(f"{'batch':>5s} {'schema':16s} {'ms/token':>9s} {'free ms/token':>13s} {'ratio':>6s}")
    for batch in (1, BATCH):
        stream_stamps(cluster, batch, EXAMPLE_SCHEMAS["enums"], False, 16)   # warm-up
        for name, schema in EXAMPLE_SCHEMAS.items():
            constrained, free = per_token_ms(cluster, batch, schema, tokens)
            print(f"{batch:5d} {name:16s} {constrained:9.2f} {free:13.2f} {constrained / free:6.2f}",
                  flush=True)


def main() -> None:
    import openai

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200, help="prompts per schema (valid phase)")
    parser.add_argument("--tokens", type=int, default=160, help="max new tokens per answer")
    parser.add_argument("--phases", default="valid,tools,speed", help="comma-separated: valid,tools,speed")
    args = parser.parse_args()
    phases = collections.OrderedDict.fromkeys(args.phases.split(","))
    unknown = set(phases) - {"valid", "tools", "speed"}
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(sorted(unknown))}: choose from valid, tools, speed")
    with exo_lab.Cluster.local(engines=2, max_cores=1) as cluster:
        cluster.load("smollm2", max_batch=BATCH, max_context=1024, progress=False)
        server = cluster.serve(host="127.0.0.1", port=0, api_key=API_KEY)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=600)
        for phase in phases:
            print(f"\n== {phase}", flush=True)
            if phase == "valid":
                valid_phase(client, args.prompts, args.tokens)
            elif phase == "tools":
                tools_phase(client, server.url)
            else:
                speed_phase(cluster, args.tokens)


if __name__ == "__main__":
    main()
