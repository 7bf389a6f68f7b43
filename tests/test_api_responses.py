"""/v1/responses through the official client: create (stream and not), parse, function calls."""
from __future__ import annotations

import json

import jsonschema
import pytest

pytest.importorskip("exo_lab.constrain", reason="the grammar engine (exo_lab/constrain.py) is not in this tree yet")

from fixtures_api import client, server  # noqa: E402,F401 (fixtures)

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


def test_parse_with_a_pydantic_model(client):
    from pydantic import BaseModel, Field

    class Sum(BaseModel):
        total: int = Field(ge=0, le=100)

    parsed = client.responses.parse(model="demo", input="2+3", text_format=Sum, max_output_tokens=40,
                                    temperature=0.7)
    assert isinstance(parsed.output_parsed, Sum)
