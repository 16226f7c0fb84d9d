"""Tests for the deterministic mock OpenAI Chat Completions server."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

try:
    import branchwise.testing.mock_upstream  # noqa: F401
except ImportError:  # running from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from branchwise.testing.mock_upstream import MockUpstream, schema_instance  # noqa: E402

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "detailed": {"type": "boolean"},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["city"],
        },
    },
}
WEATHER_ARGS = {"city": "x", "days": 1, "unit": "celsius", "detailed": True, "tags": ["x"]}


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockUpstream]:
    with MockUpstream() as server:
        yield server


@pytest.fixture
def client(upstream: MockUpstream) -> Iterator[httpx.Client]:
    upstream.clear()
    with httpx.Client(base_url=upstream.url, timeout=10.0) as http:
        yield http


def user(text: Any) -> dict[str, Any]:
    return {"role": "user", "content": text}


def chat(client: httpx.Client, messages: list[dict[str, Any]], **params: Any) -> httpx.Response:
    return client.post("/chat/completions", json={"model": "mock", "messages": messages, **params})


def stream_chunks(client: httpx.Client, messages: list[dict[str, Any]], **params: Any) -> list[Any]:
    """The decoded SSE data events of a streamed request; ``"[DONE]"`` stays a string."""
    body = {"model": "mock", "messages": messages, "stream": True, **params}
    events: list[Any] = []
    with client.stream("POST", "/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else orjson.loads(data))
    return events


def joined(chunks: list[Any], index: int, key: str = "content") -> str:
    return "".join(
        choice["delta"].get(key) or ""
        for chunk in chunks
        if isinstance(chunk, dict)
        for choice in chunk["choices"]
        if choice["index"] == index
    )


def test_echo_and_message_count_header(client: httpx.Client) -> None:
    messages = [
        {"role": "system", "content": "be terse"},
        user("first"),
        {"role": "assistant", "content": "ok"},
        user("  hello   there  "),
    ]
    response = chat(client, messages)
    assert response.status_code == 200
    assert response.headers["x-mock-messages"] == "4"
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-mock")
    assert body["model"] == "mock"
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["message"] == {"role": "assistant", "content": "[4 messages] Echo: hello   there"}
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["prompt_tokens"] == 2 + 1 + 1 + 2
    assert usage["completion_tokens"] == len("[4 messages] Echo: hello   there".split())
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 0}
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}


def test_content_parts_and_directive_stripping(client: httpx.Client) -> None:
    parts = [{"type": "text", "text": "[[delay=0]] hello"}, {"type": "image_url", "image_url": {"url": "x"}}]
    parts.append({"type": "text", "text": "world [[chunk_delay=0]]"})
    body = chat(client, [user(parts)]).json()
    assert body["choices"][0]["message"]["content"] == "[1 messages] Echo: hello world"


def test_n_gives_distinct_choices(client: httpx.Client) -> None:
    body = chat(client, [user("pick one")], n=3).json()
    contents = [c["message"]["content"] for c in body["choices"]]
    assert contents == [
        "[1 messages] Echo: pick one",
        "[1 messages] Alternative 1: pick one",
        "[1 messages] Alternative 2: pick one",
    ]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == sum(len(c.split()) for c in contents)


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_truncates(client: httpx.Client, param: str) -> None:
    body = chat(client, [user("one two three four five")], **{param: 4}).json()
    [choice] = body["choices"]
    assert choice["message"]["content"] == "[1 messages] Echo: one"
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 4

    body = chat(client, [user("one")], **{param: 4}).json()
    assert body["choices"][0]["finish_reason"] == "stop"


def test_stream_reconstructs_text_and_ends_with_done(client: httpx.Client) -> None:
    chunks = stream_chunks(client, [user("stream  me please")], n=2)
    assert chunks[-1] == "[DONE]"
    data = chunks[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in data)
    assert len({c["id"] for c in data}) == 1
    assert data[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert joined(data, 0) == "[1 messages] Echo: stream  me please"
    assert joined(data, 1) == "[1 messages] Alternative 1: stream  me please"
    # word chunks are interleaved between the choices
    word_chunks = [c for c in data if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert [c["choices"][0]["index"] for c in word_chunks[:4]] == [0, 1, 0, 1]
    finals = [c["choices"][0] for c in data if c["choices"][0]["finish_reason"]]
    assert [(f["index"], f["finish_reason"], f["delta"]) for f in finals] == [
        (0, "stop", {}),
        (1, "stop", {}),
    ]
    assert all("usage" not in c for c in data)


def test_stream_include_usage(client: httpx.Client) -> None:
    chunks = stream_chunks(
        client, [user("count these words")], stream_options={"include_usage": True}, max_tokens=3
    )
    assert chunks[-1] == "[DONE]"
    usage_chunk = chunks[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] == 3
    assert usage_chunk["usage"]["completion_tokens"] == 3
    assert usage_chunk["usage"]["total_tokens"] == 6
    assert joined(chunks, 0) == "[1 messages] Echo:"
    assert chunks[-3]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("code", [429, 500, 503])
def test_fail_directive(client: httpx.Client, code: int) -> None:
    response = chat(client, [user(f"boom [[fail={code}]]")], stream=True)
    assert response.status_code == code
    assert response.headers["x-mock-messages"] == "1"
    assert response.json() == {
        "error": {
            "message": f"mock failure {code}",
            "type": "server_error",
            "param": None,
            "code": "mock_failure",
        }
    }


def test_delay_directives(client: httpx.Client) -> None:
    response = chat(client, [{"role": "system", "content": "[[delay=0.05]]"}, user("slow")])
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "[2 messages] Echo: slow"
    chunks = stream_chunks(client, [user("[[chunk_delay=0.001]] a b c")])
    assert joined(chunks, 0) == "[1 messages] Echo: a b c"


def test_words_directive(client: httpx.Client) -> None:
    body = chat(client, [user("[[words=5]] ignored")], n=2).json()
    assert [c["message"]["content"] for c in body["choices"]] == [
        "[1 messages] w1 w2 w3 w4 w5",
        "[1 messages] alt1 w1 w2 w3 w4 w5",
    ]


def test_tool_call_non_stream(client: httpx.Client) -> None:
    messages = [user("weather? [[tool=get_weather]]")]
    body = chat(client, messages, tools=[WEATHER_TOOL]).json()
    [choice] = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    [call] = message["tool_calls"]
    assert call["id"].startswith("call_")
    assert call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert orjson.loads(call["function"]["arguments"]) == WEATHER_ARGS

    # a tool result as the last message gets a text answer, not another call
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21C"},
    ]
    body = chat(client, messages, tools=[WEATHER_TOOL]).json()
    [choice] = body["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"] == "[3 messages] Tool result: sunny, 21C"
    assert "tool_calls" not in choice["message"]


def test_tool_choice_forces_a_call(client: httpx.Client) -> None:
    other = {"type": "function", "function": {"name": "noop"}}
    body = chat(client, [user("hi")], tools=[WEATHER_TOOL, other], tool_choice="required").json()
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    named = {"type": "function", "function": {"name": "noop"}}
    body = chat(client, [user("hi")], tools=[WEATHER_TOOL, other], tool_choice=named).json()
    call = body["choices"][0]["message"]["tool_calls"][0]
    assert call["function"] == {"name": "noop", "arguments": "{}"}
    body = chat(client, [user("hi")], tools=[WEATHER_TOOL], tool_choice="auto").json()
    assert body["choices"][0]["message"]["content"] == "[1 messages] Echo: hi"


def test_a_tool_the_user_names_is_called(client: httpx.Client) -> None:
    """With `tool_choice` auto, a user message that has a word of a tool's name calls it: what a
    client that cannot write directives (a conformance suite) sees a model do."""
    other = {"type": "function", "function": {"name": "look-up_stock_price"}}
    for text, tools, called in [
        ("What's the WEATHER like in San Francisco?", [other, WEATHER_TOOL], "get_weather"),
        ("the stock, please", [WEATHER_TOOL, other], "look-up_stock_price"),
        ("get me something", [WEATHER_TOOL], None),  # `get` is too short to count
        ("weathers", [WEATHER_TOOL], None),  # a whole word only
    ]:
        message = chat(client, [user(text)], tools=tools).json()["choices"][0]["message"]
        assert (message.get("tool_calls") or [{}])[0].get("function", {}).get("name") == called, text
    # not when tool_choice is none, nor when the user's message is not the last one
    body = chat(client, [user("weather?")], tools=[WEATHER_TOOL], tool_choice="none").json()
    assert body["choices"][0]["message"]["content"] == "[1 messages] Echo: weather?"
    messages = [user("weather?"), {"role": "assistant", "content": "Which city?"}]
    assert "tool_calls" not in chat(client, messages, tools=[WEATHER_TOOL]).json()["choices"][0]["message"]


def test_tool_call_stream(client: httpx.Client) -> None:
    chunks = stream_chunks(client, [user("[[tool]] go")], tools=[WEATHER_TOOL])
    assert chunks[-1] == "[DONE]"
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["id"].startswith("call_")
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert 2 <= len(calls) - 1 <= 3
    assert all(c["index"] == 0 for c in calls)
    arguments = "".join(c["function"]["arguments"] for c in calls)
    assert orjson.loads(arguments) == WEATHER_ARGS
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert joined(chunks, 0) == ""


def test_json_schema_response_format(client: httpx.Client) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "score": {"type": "number"},
            "kind": {"enum": ["a", "b"]},
            "pets": {"type": "array", "items": {"$ref": "#/$defs/Pet"}},
            "nick": {"type": ["string", "null"]},
        },
        "$defs": {"Pet": {"type": "object", "properties": {"species": {"type": "string"}}}},
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    body = chat(client, [user("describe")], response_format=response_format).json()
    parsed = orjson.loads(body["choices"][0]["message"]["content"])
    assert parsed == {
        "name": "name",
        "age": 1,
        "score": 1.0,
        "kind": "a",
        "pets": [{"species": "species"}],
        "nick": "nick",
    }
    body = chat(client, [user("hi there")], response_format={"type": "json_object"}).json()
    assert orjson.loads(body["choices"][0]["message"]["content"]) == {"echo": "hi there"}


def test_schema_instance_defaults() -> None:
    assert schema_instance({}) == {}
    assert schema_instance({"type": "object", "properties": {"a": {"type": "string"}}}) == {"a": "x"}
    assert schema_instance({"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 5}]}) == 5


def test_request_log_and_clear(client: httpx.Client, upstream: MockUpstream) -> None:
    chat(client, [user("one")])
    chat(client, [user("two")], temperature=0.5)
    log = client.get(upstream.base_url + "/_requests").json()
    assert [r["messages"][0]["content"] for r in log] == ["one", "two"]
    assert log[1]["temperature"] == 0.5
    assert upstream.requests == log

    assert client.delete(upstream.base_url + "/_requests").status_code == 200
    assert client.get(upstream.base_url + "/_requests").json() == []
    chat(client, [user("three")])
    assert [r["messages"][0]["content"] for r in upstream.requests] == ["three"]
    upstream.clear()
    assert upstream.requests == []


def test_reasoning_content(client: httpx.Client) -> None:
    messages = [{"role": "system", "content": "[[reasoning=think about it]]"}, user("why")]
    body = chat(client, messages).json()
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] == "think about it"
    assert message["content"] == "[2 messages] Echo: why"
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 3

    chunks = stream_chunks(client, messages)
    assert joined(chunks, 0, "reasoning_content") == "think about it"
    assert joined(chunks, 0) == "[2 messages] Echo: why"
    kinds = [next(iter(c["choices"][0]["delta"]), None) for c in chunks[:-1]]
    assert kinds.index("reasoning_content") < kinds.index("content", 1)


def test_cut_directive(client: httpx.Client) -> None:
    with pytest.raises(httpx.HTTPError):
        chat(client, [user("[[cut]] bye")])
    body = {"model": "mock", "messages": [user("[[cut]] a b c d e f")], "stream": True}
    seen: list[str] = []
    with pytest.raises(httpx.HTTPError):
        with client.stream("POST", "/chat/completions", json=body) as response:
            for line in response.iter_lines():
                seen.append(line)
    assert seen and "data: [DONE]" not in seen
    # the server is still fine afterwards
    assert chat(client, [user("ok")]).status_code == 200


def test_malformed_directive(client: httpx.Client) -> None:
    response = chat(client, [user("[[malformed]]")])
    assert response.status_code == 200
    assert response.text == "not json"
    body = {"model": "mock", "messages": [user("[[malformed]] x y")], "stream": True}
    with client.stream("POST", "/chat/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[2] == "data: {not json"
    assert lines[-1] == "data: [DONE]"
    good = [orjson.loads(line[6:]) for line in lines[:-1] if line != "data: {not json"]
    assert joined(good, 0) == "[1 messages] Echo: x y"


def test_models_health_and_errors(client: httpx.Client, upstream: MockUpstream) -> None:
    models = client.get("/models").json()
    assert "mock" in [m["id"] for m in models["data"]]
    assert client.get(upstream.base_url + "/healthz").json() == {"status": "ok"}
    assert client.post(upstream.base_url + "/chat/completions", json={"messages": [user("x")]}).is_success
    assert client.get("/nope").status_code == 404
    assert client.get("/chat/completions").status_code == 405
    assert client.post("/chat/completions", content=b"{nope").status_code == 400
    assert client.post("/chat/completions", json={"model": "mock"}).status_code == 400


async def test_async_client_from_another_event_loop(upstream: MockUpstream) -> None:
    async with httpx.AsyncClient(base_url=upstream.url, timeout=10.0) as http:
        response = await http.post("/chat/completions", json={"model": "m", "messages": [user("async")]})
    assert response.json()["choices"][0]["message"]["content"] == "[1 messages] Echo: async"
    assert response.json()["model"] == "m"
