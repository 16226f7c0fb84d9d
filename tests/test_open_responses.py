"""The Open Responses conformance suite's HTTP tests (openresponses/openresponses,
`src/lib/compliance-tests.ts`), done here against the mock upstream: the same requests, the same
checks (every Response valid as `ResponseResource`, every streamed event as its schema, the
semantic checks of each test), through the official SDK where the suite's request is one the
SDK sends as is, and raw HTTP where the suite reads the wire (its SSE parser). The suite's
WebSocket tests and its `compaction` item check are not here.

Then what the suite does not reach: the penalties (accepted, sent upstream, echoed; the embedded
model's sampling), `allowed_tools`, `phase`, and the checker that conftest.py runs on every reply
of the test session (tests/open_responses_spec.py), shown to catch what it must.
"""

from __future__ import annotations

import inspect
import json

import orjson
import pytest

from branchwise.backends.local.prompt import plan
from branchwise.core.chat import ChatRequest
from branchwise.wire.chat import chat_params
from branchwise.wire.models import CreateResponse

from . import open_responses_spec
from .conftest import _recorder, require_shared
from .helpers import MODEL, check_error, parse_sse

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather for a location",
    "parameters": {
        "type": "object",
        "properties": {"location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"}},
        "required": ["location"],
    },
}
WEATHER_QUESTION = {"type": "message", "role": "user", "content": "What's the weather like in San Francisco?"}
RED_HEART = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAIAAAD8GO2jAAABmklEQVR42tyWAaTyUBzFew/"
             "eG4AHz+MBSAHKBiJRGFKwIgQQJKLUIioBIhCAiCAAEizAQIAECaASqFFJq84nudjnaqvuPnxzgP9xfrq5938csPn7PwHTKSoV")


@pytest.fixture(scope="module")
def spec() -> open_responses_spec.Spec:
    return open_responses_spec.load(require_shared("reference/open-responses/openapi.json"))


def valid_response(spec, obj) -> dict:
    assert spec.response_problems(obj, "response") == []
    return obj


async def post_json(raw, spec, body: dict) -> dict:
    """The suite's `makeRequest` without streaming: 200, and the body a valid ResponseResource."""
    resp = await raw.post("/v1/responses", json={**body, "stream": False})
    assert resp.status_code == 200, resp.text
    return valid_response(spec, resp.json())


async def stream(raw, spec, body: dict) -> tuple[list[dict], dict]:
    """The suite's streaming request and SSE parser: every event valid as its schema; the final
    Response the one its terminal event carries."""
    resp = await raw.post("/v1/responses", json={**body, "stream": True})
    assert resp.status_code == 200, resp.text
    events = [data for _, data in parse_sse(resp.text)]
    assert events, "no streaming events"
    for k, e in enumerate(events):
        assert spec.event_problems(e, f"event {k}") == []
    terminal = [e for e in events if e["type"] in ("response.completed", "response.failed", "response.incomplete")]
    assert len(terminal) == 1 and terminal[0] is events[-1]
    return events, valid_response(spec, terminal[0]["response"])


def has_output(r: dict, kind: str | None = None) -> bool:
    return bool(r["output"]) and (kind is None or any(o["type"] == kind for o in r["output"]))


# ---------------------------------------------------------------- the suite's HTTP tests


async def test_basic_response(client, raw, spec):
    body = {"model": MODEL, "input": [{"type": "message", "role": "user", "content": "Say hello in exactly 3 words."}]}
    r = await post_json(raw, spec, body)
    assert has_output(r) and r["status"] == "completed"
    sdk = await client.responses.create(**body)
    assert sdk.status == "completed" and sdk.output_text == "[1 messages] Echo: Say hello in exactly 3 words."


async def test_assistant_phase(client, raw, spec, mock):
    """Assistant history labelled with `phase` is accepted, kept on the stored items, and not
    sent to the model (Chat Completions has no such field)."""
    history = [
        {"type": "message", "role": "assistant", "phase": "commentary", "content": "I should answer with the saved number."},
        {"type": "message", "role": "assistant", "phase": "final_answer", "content": "The number is four."},
        {"type": "message", "role": "user", "content": "Repeat only the number."},
    ]
    r = await post_json(raw, spec, {"model": MODEL, "input": history})
    assert has_output(r) and r["status"] == "completed"
    sdk = await client.responses.create(model=MODEL, input=history)
    items = [it async for it in client.responses.input_items.list(sdk.id, order="asc")]
    assert [getattr(it, "phase", None) for it in items] == ["commentary", "final_answer", None]
    assert all(set(m) == {"role", "content"} for m in mock.requests[-1]["messages"])


async def test_streaming_response(raw, spec):
    events, final = await stream(raw, spec, {
        "model": MODEL, "input": [{"type": "message", "role": "user", "content": "Count from 1 to 5."}]})
    assert final["status"] == "completed"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


async def test_system_prompt(client, raw, spec, mock):
    body = {"model": MODEL, "input": [
        {"type": "message", "role": "system", "content": "You are a pirate. Always respond in pirate speak."},
        {"type": "message", "role": "user", "content": "Say hello."}]}
    r = await post_json(raw, spec, body)
    assert has_output(r) and r["status"] == "completed"
    assert mock.requests[-1]["messages"][0] == {"role": "system",
                                                "content": "You are a pirate. Always respond in pirate speak."}


async def test_tool_calling(client, raw, spec):
    body = {"model": MODEL, "input": [WEATHER_QUESTION], "tools": [WEATHER_TOOL]}
    r = await post_json(raw, spec, body)
    assert has_output(r, "function_call")
    sdk = await client.responses.create(**body)
    [call] = [o for o in sdk.output if o.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"location": "x"}


async def test_tool_calling_streaming(raw, spec):
    events, final = await stream(raw, spec, {"model": MODEL, "input": [WEATHER_QUESTION], "tools": [WEATHER_TOOL],
                                             "tool_choice": {"type": "function", "name": "get_weather"}})
    types = [e["type"] for e in events]
    assert any(e["type"] == "response.output_item.added" and e["item"]["type"] == "function_call" for e in events)
    assert "response.function_call_arguments.delta" in types and "response.function_call_arguments.done" in types
    assert any(e["type"] == "response.output_item.done" and e["item"]["type"] == "function_call" for e in events)
    assert has_output(final, "function_call")


async def test_function_call_round_trip(client, raw, spec):
    first = await post_json(raw, spec, {
        "model": MODEL, "input": "Use the weather tool to get the temperature in San Francisco.",
        "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "name": "get_weather"}})
    [call] = [o for o in first["output"] if o["type"] == "function_call"]
    second = await post_json(raw, spec, {
        "model": MODEL, "previous_response_id": first["id"],
        "input": [{"type": "function_call_output", "call_id": call["call_id"], "output": "64 degrees and clear"}]})
    assert has_output(second) and second["status"] == "completed"
    assert second["output"][0]["content"][0]["text"] == "[3 messages] Tool result: 64 degrees and clear"


async def test_image_input(raw, spec, mock):
    r = await post_json(raw, spec, {"model": MODEL, "input": [{"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "What do you see in this image? Answer in one sentence."},
        {"type": "input_image", "image_url": RED_HEART}]}]})
    assert has_output(r) and r["status"] == "completed"
    sent = mock.requests[-1]["messages"][-1]["content"]
    assert sent[1] == {"type": "image_url", "image_url": {"url": RED_HEART, "detail": "auto"}}


async def test_multi_turn(raw, spec):
    r = await post_json(raw, spec, {"model": MODEL, "input": [
        {"type": "message", "role": "user", "content": "My name is Alice."},
        {"type": "message", "role": "assistant", "content": "Hello Alice! Nice to meet you. How can I help you today?"},
        {"type": "message", "role": "user", "content": "What is my name?"}]})
    assert has_output(r) and r["status"] == "completed"
    assert r["output"][0]["content"][0]["text"] == "[3 messages] Echo: What is my name?"


async def test_previous_response_id(raw, spec):
    first = await post_json(raw, spec, {"model": MODEL, "input": "Remember this code word: papaya. Reply with only OK."})
    second = await post_json(raw, spec, {"model": MODEL, "previous_response_id": first["id"],
                                         "input": "What code word did I ask you to remember?"})
    assert has_output(second) and second["status"] == "completed" and second["previous_response_id"] == first["id"]


async def test_compact_response(raw, spec):
    """The schema of a compaction (its `compaction` item is another change's)."""
    resp = await raw.post("/v1/responses/compact", json={
        "model": MODEL, "prompt_cache_key": "openresponses-compact-test", "input": [
            {"type": "message", "role": "user", "content": "We agreed to launch on Tuesday and notify support first."},
            {"type": "message", "role": "assistant",
             "content": "Understood. The launch is Tuesday, with support notified beforehand."}]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert open_responses_spec._problems(spec.compaction, body, "compaction") == []
    assert body["object"] == "response.compaction" and body["output"]


async def test_compact_missing_model(raw, spec):
    resp = await raw.post("/v1/responses/compact", json={
        "input": [{"type": "message", "role": "user", "content": "Compact this conversation."}]})
    check_error(resp, 400, "model", "missing_required_parameter")
    assert open_responses_spec._problems(spec.error, resp.json(), "error") == []


# ---------------------------------------------------------------- penalties


async def test_penalties_are_sent_upstream_and_echoed(client, raw, spec, mock):
    r = await client.responses.create(model=MODEL, input="hi", extra_body={"presence_penalty": 0.5,
                                                                           "frequency_penalty": -1.25})
    sent = mock.requests[-1]
    assert sent["presence_penalty"] == 0.5 and sent["frequency_penalty"] == -1.25
    assert r.presence_penalty == 0.5 and r.frequency_penalty == -1.25
    stored = await client.responses.retrieve(r.id)
    assert (stored.presence_penalty, stored.frequency_penalty) == (0.5, -1.25)
    # in every streamed snapshot too
    events, final = await stream(raw, spec, {"model": MODEL, "input": "hi", "presence_penalty": 2})
    snapshots = [e["response"] for e in events if "response" in e]
    assert len(snapshots) == 3 and all(s["presence_penalty"] == 2 and s["frequency_penalty"] == 0 for s in snapshots)


async def test_penalties_not_set_are_zero_and_not_sent(client, mock):
    r = await client.responses.create(model=MODEL, input="hi")
    assert (r.presence_penalty, r.frequency_penalty) == (0, 0)
    assert "presence_penalty" not in mock.requests[-1] and "frequency_penalty" not in mock.requests[-1]


async def test_bad_penalties_are_refused(raw, mock):
    for name in ("presence_penalty", "frequency_penalty"):
        for value in (2.5, -2.01, "1", True, None):
            resp = await raw.post("/v1/responses", json={"model": MODEL, "input": "x", name: value})
            if value is None:  # null is "not set"
                assert resp.status_code == 200, resp.text
                continue
            check_error(resp, 400, name, "invalid_value", case=f"{name}={value!r}")
    assert len(mock.requests) == 2  # only the two null ones reached the model


def test_penalties_reach_the_embedded_model_sampling():
    req = CreateResponse(model="smol", input="hi", presence_penalty=0.25, frequency_penalty=-0.5)
    sampling = plan(ChatRequest(model="smol", messages=b'[{"role":"user","content":"hi"}]',
                                params=chat_params(req))).sampling
    assert sampling["presence_penalty"] == 0.25 and sampling["frequency_penalty"] == -0.5
    # the sampling goes to llama-cpp-python's `create_completion` as keyword arguments
    llama_cpp = pytest.importorskip("llama_cpp")
    assert set(sampling) <= set(inspect.signature(llama_cpp.Llama.create_completion).parameters)


# ---------------------------------------------------------------- allowed_tools


async def test_allowed_tools_narrow_what_the_model_sees(client, raw, spec, mock):
    other = {**WEATHER_TOOL, "name": "get_time", "description": "The time"}
    choice = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_time"}]}
    r = await client.responses.create(model=MODEL, input="hi", tools=[WEATHER_TOOL, other], tool_choice=choice)
    sent = mock.requests[-1]
    assert [t["function"]["name"] for t in sent["tools"]] == ["get_time"] and sent["tool_choice"] == "required"
    assert [o.name for o in r.output if o.type == "function_call"] == ["get_time"]
    assert r.tool_choice.type == "allowed_tools" and r.tool_choice.mode == "required"
    assert r.tool_choice.tools == [{"type": "function", "name": "get_time"}]
    assert [t.name for t in r.tools] == ["get_weather", "get_time"]  # the tools echoed are those sent
    # mode defaults to auto
    body = {"model": MODEL, "input": "hi", "tools": [WEATHER_TOOL, other],
            "tool_choice": {"type": "allowed_tools", "tools": [{"type": "function", "name": "get_weather"}]}}
    echoed = await post_json(raw, spec, body)
    assert echoed["tool_choice"]["mode"] == "auto" and mock.requests[-1]["tool_choice"] == "auto"


async def test_allowed_tools_must_name_given_tools(raw, mock):
    for choice, param in [
        ({"type": "allowed_tools", "tools": [{"type": "function", "name": "nope"}]}, "tool_choice.tools[0].name"),
        ({"type": "allowed_tools", "tools": []}, "tool_choice.tools"),
        ({"type": "allowed_tools", "tools": [{"type": "function", "name": "get_weather"}], "mode": "often"},
         "tool_choice.mode"),
    ]:
        resp = await raw.post("/v1/responses", json={"model": MODEL, "input": "x", "tools": [WEATHER_TOOL],
                                                     "tool_choice": choice})
        check_error(resp, 400, param, case=str(choice))
    assert mock.requests == []


# ---------------------------------------------------------------- the checker itself


async def test_every_reply_of_the_session_is_recorded(raw, client):
    """conftest.py checks what `_recorder` holds after each test: it must see the app's replies,
    SDK and raw alike, streams included. (Only with the spec at hand: without it nothing is recorded.)"""
    require_shared("reference/open-responses/openapi.json")
    _recorder.take()
    await client.responses.create(model=MODEL, input="one")
    await raw.post("/v1/responses", json={"model": MODEL, "input": "two", "stream": True})
    await raw.get("/v1/conversations/conv_123")  # not an Open Responses route: not recorded
    replies = _recorder.replies
    assert [(r.method, r.path, r.status) for r in replies] == [("POST", "/v1/responses", 200)] * 2
    assert replies[1].content_type.startswith("text/event-stream") and b"response.completed" in b"".join(
        replies[1].chunks)


def test_the_checker_finds_what_the_spec_refuses(spec):
    good = {"id": "resp_1", "object": "response", "created_at": 1, "completed_at": None, "status": "completed",
            "incomplete_details": None, "model": "m", "previous_response_id": None, "instructions": None,
            "output": [], "error": None, "tools": [], "tool_choice": "auto", "truncation": "disabled",
            "parallel_tool_calls": True, "text": {"format": {"type": "text"}}, "top_p": 1.0,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "top_logprobs": 0, "temperature": 1.0,
            "reasoning": None, "usage": None, "max_output_tokens": None, "max_tool_calls": None, "store": True,
            "background": False, "service_tier": "default", "metadata": {}, "safety_identifier": None,
            "prompt_cache_key": None, "conversation": None}  # an extension field is allowed
    assert spec.response_problems(good, "r") == []
    missing = {k: v for k, v in good.items() if k != "presence_penalty"}
    assert spec.response_problems(missing, "r") == ["r: 'presence_penalty' is a required property "
                                                    f"(value: {json.dumps(missing)[:300]})"]
    bad_item = {**good, "output": [{"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": None}]}
    [problem] = spec.response_problems(bad_item, "r")
    assert problem.startswith("r.output[0].encrypted_content: None is not of type 'string'")
    [problem] = spec.response_problems({**good, "alternatives": [missing]}, "r")
    assert problem.startswith("r.alternatives[0]: 'presence_penalty' is a required property")
    delta = {"type": "response.output_text.delta", "sequence_number": 3, "item_id": "msg_1", "output_index": 0,
             "content_index": 0, "delta": "hi"}
    assert spec.event_problems(delta, "e") == []
    [problem] = spec.event_problems({**delta, "content_index": "0"}, "e")
    assert problem.startswith("e (response.output_text.delta).content_index: '0' is not of type 'integer'")
    [problem] = spec.event_problems({**delta, "type": "response.reasoning_text.delta"}, "e")
    assert "'response.reasoning_text.delta' is not an Open Responses event" in problem
    assert spec.event_problems({**delta, "type": "acme:trace"}, "e") == []  # prefixed: an extension


def test_the_checker_reads_whole_events_of_a_cut_stream(spec):
    reply = open_responses_spec.Reply("POST", "/v1/responses", "", 200, "text/event-stream")
    good = {"type": "response.output_text.delta", "sequence_number": 0, "item_id": "m", "output_index": 0,
            "content_index": 0, "delta": "x"}
    reply.chunks = [b"event: x\ndata: " + orjson.dumps(good) + b"\n\n", b"event: x\ndata: {\"type\": \"respo"]
    assert open_responses_spec.reply_problems(spec, reply) == []
    reply.chunks[0] = reply.chunks[0].replace(b'"delta":"x"', b'"delta":1')
    [problem] = open_responses_spec.reply_problems(spec, reply)
    assert problem.startswith("POST /v1/responses -> 200 event 0 (response.output_text.delta).delta: 1 is not")
