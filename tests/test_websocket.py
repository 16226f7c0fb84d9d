"""WebSocket mode on /v1/responses (docs/websocket.md), through the official SDK's
`responses.connect()` against the app served by uvicorn on a real socket, on both databases:
the same events as SSE, turns one at a time in order, continuation from the connection's own
state (`store: false` chains), eviction after a failed continuation, the `error` envelope, the
API key on the handshake, the connection and duration limits, and branchwise's extensions."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import pytest
import websockets
from openai.types.responses.responses_server_event import ResponseWsError

from .helpers import ANY, MODEL, new_conversation, post_sse, served, until, validate_event

TERMINAL = {"response.completed", "response.failed", "response.incomplete"}
LIMIT = "websocket_connection_limit_reached"
TURN_TIMEOUT_S = 30


@pytest.fixture
async def server(settings) -> AsyncIterator[tuple[Any, str]]:
    async with served(settings) as found:
        yield found


def sdk(url: str, api_key: str = "test-key") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=api_key, base_url=f"{url}/v1", max_retries=0)


@pytest.fixture
async def client(server) -> AsyncIterator[openai.AsyncOpenAI]:
    async with sdk(server[1]) as c:
        yield c


async def read_turn(conn, n: int = 1) -> list[dict]:
    """One turn's messages, up to its `n`-th terminal event or its error envelope: each event
    checked as an SSE event is (the SDK's own class for its type), each error as the envelope."""
    events: list[dict] = []
    async with asyncio.timeout(TURN_TIMEOUT_S):
        while True:
            data = json.loads(await conn.recv_bytes())
            events.append(data)
            if data["type"] == "error":
                ResponseWsError.model_validate(data)
                return events
            validate_event(data["type"], data)
            if sum(e["type"] in TERMINAL for e in events) == n:
                return events


async def create(conn, **body) -> list[dict]:
    await conn.send({"type": "response.create", "model": MODEL, **body})
    return await read_turn(conn, body.get("n", 1))


def final(events: list[dict]) -> dict:
    assert events[-1]["type"] == "response.completed", events[-1]
    return events[-1]["response"]


def check_error(events: list[dict], status: int, code: str, param: Any = ANY) -> dict:
    """The turn ended with the Open Responses `error` envelope, and nothing before it."""
    assert len(events) == 1, [e["type"] for e in events]
    env = events[0]
    assert set(env) == {"type", "status", "error"} and env["type"] == "error", env
    assert env["status"] == status, env
    err = env["error"]
    assert set(err) == {"type", "code", "message", "param"}, err
    assert err["code"] == code and isinstance(err["message"], str) and err["message"], err
    if param is not ANY:
        assert err["param"] == param, err
    return err


async def closed_with(conn) -> int:
    """The close code of a connection the server closes next."""
    with pytest.raises(websockets.ConnectionClosed) as e:
        async with asyncio.timeout(TURN_TIMEOUT_S):
            await conn.recv_bytes()
    return e.value.rcvd.code


# ---------------------------------------------------------------- the same response as SSE


async def test_a_turn_is_the_sse_stream_event_for_event(client, server, mock):
    async with client.responses.connect() as conn:
        events = await create(conn, input="Count from 1 to 3.")
    response = final(events)
    async with httpx2.AsyncClient(base_url=server[1]) as http:
        sse = [data for _, data in await post_sse(http, {"input": "Count from 1 to 3."})]
    # event for event: the same types, numbering and items (ids and times aside)
    assert [e["type"] for e in events] == [e["type"] for e in sse]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert response["output"][0]["content"][0]["text"] == sse[-1]["response"]["output"][0]["content"][0]["text"]
    # stored as over HTTP
    stored = await client.responses.retrieve(response["id"])
    assert stored.status == "completed" and stored.output_text == "[1 messages] Echo: Count from 1 to 3."


async def test_turns_on_one_connection_run_one_at_a_time_in_order(client, mock):
    async with client.responses.connect() as conn:
        # three sent at once; the first is the slowest upstream
        for i, delay in enumerate((0.4, 0.0, 0.1)):
            await conn.send({"type": "response.create", "model": MODEL, "store": False,
                             "input": f"[[delay={delay}]] turn {i}"})
        turns = [await read_turn(conn) for _ in range(3)]
    for i, events in enumerate(turns):
        # each turn's events together, numbered from 0, its answer to its own request
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert final(events)["output"][0]["content"][0]["text"] == f"[1 messages] Echo: turn {i}"
    # the upstream was asked in order: the second only once the first had answered
    assert [r["messages"][-1]["content"] for r in mock.requests] == [
        f"[[delay={d}]] turn {i}" for i, d in enumerate((0.4, 0.0, 0.1))]


# ---------------------------------------------------------------- continuation


async def test_store_false_chain_continues_on_its_connection_only(client, mock):
    async with client.responses.connect() as conn:
        first = final(await create(conn, store=False, input="Remember the code word: cobalt."))
        second = final(await create(conn, store=False, previous_response_id=first["id"],
                                    input="What is the code word?"))
        assert second["previous_response_id"] == first["id"] and second["store"] is False
        # the model saw the whole chain, which only the connection holds
        assert [m["content"] for m in mock.requests[-1]["messages"]] == [
            "Remember the code word: cobalt.", "[1 messages] Echo: Remember the code word: cobalt.",
            "What is the code word?"]
        third = final(await create(conn, store=False, previous_response_id=second["id"], input="And now?"))
        assert third["output"][0]["content"][0]["text"] == "[5 messages] Echo: And now?"
    # nothing of it was stored: not over HTTP, not on another connection
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(second["id"])
    with pytest.raises(openai.BadRequestError) as e:
        await client.responses.create(model=MODEL, previous_response_id=second["id"], input="x")
    assert e.value.code == "previous_response_not_found"
    async with client.responses.connect() as conn:
        events = await create(conn, store=False, previous_response_id=third["id"], input="after reconnect")
        check_error(events, 400, "previous_response_not_found", "previous_response_id")
        # the recovery the spec names: a new chain with the full input, on the same connection
        recovered = final(await create(conn, store=False, input=[
            {"type": "message", "role": "user", "content": "Start over: the code word was cobalt."}]))
        assert recovered["previous_response_id"] is None


async def test_stored_responses_continue_from_the_store_on_any_connection(client, mock):
    over_http = await client.responses.create(model=MODEL, input="one")
    async with client.responses.connect() as conn:
        two = final(await create(conn, previous_response_id=over_http.id, input="two"))
    async with client.responses.connect() as conn:  # a new connection: hydrated from the store
        three = final(await create(conn, previous_response_id=two["id"], input="three"))
    assert three["output"][0]["content"][0]["text"] == "[5 messages] Echo: three"
    back = await client.responses.create(model=MODEL, previous_response_id=three["id"], input="four")
    assert back.output_text == "[7 messages] Echo: four"  # one line: HTTP, two connections, HTTP again


async def test_only_the_most_recent_turn_is_kept(client):
    async with client.responses.connect() as conn:
        first = final(await create(conn, store=False, input="a"))
        final(await create(conn, store=False, input="b"))  # a new chain: the first is let go
        events = await create(conn, store=False, previous_response_id=first["id"], input="c")
    check_error(events, 400, "previous_response_not_found", "previous_response_id")


async def test_failed_continuation_evicts_what_it_continued(client, mock):
    async with client.responses.connect() as conn:
        first = final(await create(conn, store=False, input="Remember: ember."))
        # an output for a call that was never made is refused before the model is asked
        events = await create(conn, store=False, previous_response_id=first["id"], input=[
            {"type": "function_call_output", "call_id": "call_missing", "output": "no such call"}])
        err = check_error(events, 400, "invalid_request_error", "input")
        assert err["message"] == "No tool call found for function call output with call_id call_missing."
        assert len(mock.requests) == 1
        events = await create(conn, store=False, previous_response_id=first["id"], input="stale")
        check_error(events, 400, "previous_response_not_found", "previous_response_id")
        # a continuation that fails upstream (response.failed) evicts too
        again = final(await create(conn, store=False, input="fresh"))
        failed = await create(conn, store=False, previous_response_id=again["id"], input="[[fail=500]] x")
        assert failed[-1]["type"] == "response.failed"
        events = await create(conn, store=False, previous_response_id=again["id"], input="stale")
        check_error(events, 400, "previous_response_not_found", "previous_response_id")


async def test_an_unstored_chain_cannot_be_continued_by_a_stored_response(client):
    async with client.responses.connect() as conn:
        first = final(await create(conn, store=False, input="a"))
        events = await create(conn, previous_response_id=first["id"], input="b")  # store: true
        check_error(events, 400, "invalid_value", "store")
        # a failed continuation, so the chain is let go
        events = await create(conn, store=False, previous_response_id=first["id"], input="b")
        check_error(events, 400, "previous_response_not_found", "previous_response_id")


async def test_tool_call_round_trip_on_the_connection(client, mock):
    tool = {"type": "function", "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    async with client.responses.connect() as conn:
        events = await create(conn, store=False, tools=[tool], tool_choice="required", input="Weather in Paris?")
        call = final(events)["output"][0]
        assert call["type"] == "function_call"
        # the call must be answered before anything else
        events = await create(conn, store=False, tools=[tool], previous_response_id=final(events)["id"],
                              input="never mind")
        check_error(events, 400, "tool_output_missing", "input")
        first = final(await create(conn, store=False, tools=[tool], input="Weather in Paris?",
                                   tool_choice="required"))
        answer = final(await create(conn, store=False, tools=[tool], previous_response_id=first["id"], input=[
            {"type": "function_call_output", "call_id": first["output"][0]["call_id"], "output": "sunny"}]))
    assert answer["output"][0]["content"][0]["text"] == "[3 messages] Tool result: sunny"
    assert mock.requests[-1]["messages"][1]["tool_calls"][0]["id"] == first["output"][0]["call_id"]


async def test_a_compacted_window_starts_a_new_chain(client, server, mock):
    """The spec's WebSocket compaction: /responses/compact's output, as it is, plus the next
    message, is the input of a new chain."""
    async with httpx2.AsyncClient(base_url=server[1]) as http:
        r = await http.post("/v1/responses/compact", json={"model": MODEL, "input": [
            {"type": "message", "role": "user", "content": "Remember the code word: slate."},
            {"type": "message", "role": "assistant", "content": "OK."}]})
    assert r.status_code == 200, r.text
    window = r.json()["output"]
    async with client.responses.connect() as conn:
        done = final(await create(conn, store=False, tools=[], input=[
            *window, {"type": "message", "role": "user", "content": "Continue from here."}]))
    assert done["previous_response_id"] is None
    assert done["output"][0]["content"][0]["text"].endswith("Echo: Continue from here.")


# ---------------------------------------------------------------- branchwise's extensions


async def test_n_alternatives_and_continuing_one_of_them(client, mock):
    async with client.responses.connect() as conn:
        events = await create(conn, store=False, n=2, input="hi")
        ends = [e for e in events if e["type"] in TERMINAL]
        assert [e["alternative"] for e in ends] == [0, 1]
        assert {e["alternative"] for e in events} == {0, 1}  # every event names its alternative
        second = ends[1]["response"]
        assert second["output"][0]["content"][0]["text"] == "[1 messages] Alternative 1: hi"
        nxt = final(await create(conn, store=False, previous_response_id=second["id"], input="go on"))
    assert nxt["output"][0]["content"][0]["text"] == "[3 messages] Echo: go on"
    assert mock.requests[-1]["messages"][1]["content"] == "[1 messages] Alternative 1: hi"


async def test_conversation_turns_and_their_concurrency_policy(client, mock):
    conv = await new_conversation(client, "seed")
    async with client.responses.connect() as conn:
        one = final(await create(conn, conversation=conv.id, input="one"))
        two = final(await create(conn, conversation=conv.id, input="two"))
        assert two["output"][0]["content"][0]["text"] == "[4 messages] Echo: two"
        items = [it async for it in client.conversations.items.list(conv.id, order="asc")]
        assert [it.id for it in items][-1] == two["output"][0]["id"] and len(items) == 5
        assert one["conversation"]["id"] == conv.id
        # `reject` while another response holds the conversation: refused, the connection goes on
        slow = asyncio.create_task(client.responses.create(
            model=MODEL, conversation=conv.id, input="[[delay=1.0]] slow", extra_body={"concurrency": "reject"}))
        await until(lambda: len(mock.requests) == 3, "the slow response to reach the upstream")
        events = await create(conn, conversation=conv.id, input="now", concurrency="reject")
        check_error(events, 400, "conversation_locked", "conversation")
        assert (await slow).status == "completed"
        # `queue` waits its turn instead
        slow = asyncio.create_task(client.responses.create(
            model=MODEL, conversation=conv.id, input="[[delay=0.5]] slow", extra_body={"concurrency": "queue"}))
        await until(lambda: len(mock.requests) == 4, "the slow response to reach the upstream")
        queued = final(await create(conn, conversation=conv.id, input="after it", concurrency="queue"))
        assert queued["output"][0]["content"][0]["text"] == "[10 messages] Echo: after it"
        await slow


# ---------------------------------------------------------------- refused messages


async def test_refused_messages_get_the_error_envelope_and_the_connection_goes_on(client, mock):
    cases = [
        ("{not json", 400, "invalid_json", None),
        ("[1, 2]", 400, "invalid_json", None),
        (json.dumps({"model": MODEL, "input": "x"}), 400, "missing_required_parameter", "type"),
        (json.dumps({"type": "response.cancel"}), 400, "invalid_value", "type"),
        (json.dumps({"type": "response.create", "model": MODEL, "input": "x", "stream": True}), 400,
         "unknown_parameter", "stream"),
        (json.dumps({"type": "response.create", "model": MODEL, "input": "x", "background": False}), 400,
         "unknown_parameter", "background"),
        (json.dumps({"type": "response.create", "model": MODEL, "input": "x", "stream_options": {}}), 400,
         "unknown_parameter", "stream_options"),
        (json.dumps({"type": "response.create", "model": MODEL, "input": "x", "temperature": 9}), 400,
         "invalid_value", "temperature"),
        (json.dumps({"type": "response.create", "model": MODEL, "input": "x", "generate": False}), 400,
         "unknown_parameter", "generate"),
        (json.dumps({"type": "response.create", "model": MODEL}), 400, "missing_required_parameter", "input"),
        (json.dumps({"type": "response.create", "model": MODEL, "input": "x", "conversation": "conv_nope"}), 404,
         "invalid_request_error", "conversation"),
    ]
    async with client.responses.connect() as conn:
        for text, status, code, param in cases:
            await conn.send_raw(text)
            check_error(await read_turn(conn), status, code, param)
        assert mock.requests == []  # nothing refused reached the upstream
        ok = final(await create(conn, input="still here"))
    assert ok["status"] == "completed"


async def test_events_are_text_messages_and_binary_requests_are_read(server):
    """Below the SDK: what the frames are."""
    async with websockets.connect(f"ws://{server[1].removeprefix('http://')}/v1/responses") as ws:
        await ws.send(json.dumps({"type": "response.create", "model": MODEL, "input": "hi"}).encode())  # binary
        while True:
            async with asyncio.timeout(TURN_TIMEOUT_S):
                message = await ws.recv()
            assert isinstance(message, str)  # a text frame, one JSON event
            if json.loads(message)["type"] == "response.completed":
                break


async def test_a_message_longer_than_a_body_may_be_closes_the_connection(settings, mock):
    async with served(settings.model_copy(update={"max_body_bytes": 2048})) as (_, url):
        async with websockets.connect(f"ws://{url.removeprefix('http://')}/v1/responses") as ws:
            await ws.send(json.dumps({"type": "response.create", "model": MODEL, "input": "x" * 4096}))
            with pytest.raises(websockets.ConnectionClosed) as e:
                async with asyncio.timeout(TURN_TIMEOUT_S):
                    await ws.recv()
    assert e.value.rcvd.code == 1009  # message too big (uvicorn's `ws_max_size`)
    assert mock.requests == []


# ---------------------------------------------------------------- the handshake and the limits


async def test_the_api_key_is_checked_on_the_handshake(settings, mock):
    async with served(settings.model_copy(update={"api_key": "sekret"})) as (_, url):
        async with sdk(url, "wrong") as bad:
            with pytest.raises(websockets.InvalidStatus) as e:
                async with bad.responses.connect():
                    pass
        assert e.value.response.status_code == 401
        assert json.loads(e.value.response.body)["error"]["code"] == "invalid_api_key"
        async with sdk(url, "sekret") as good, good.responses.connect() as conn:
            assert final(await create(conn, input="hi"))["status"] == "completed"


async def test_unknown_socket_paths_are_refused(server):
    with pytest.raises(websockets.InvalidStatus) as e:
        async with websockets.connect(f"ws://{server[1].removeprefix('http://')}/v1/nowhere"):
            pass
    assert e.value.response.status_code == 403


async def test_connections_past_the_limit_are_refused(settings, mock):
    async with served(settings.model_copy(update={"websocket_max_connections": 2})) as (app, url):
        async with sdk(url) as client:
            async with client.responses.connect() as a, client.responses.connect() as b:
                async with client.responses.connect() as c:
                    check_error(await read_turn(c), 429, LIMIT)
                    assert await closed_with(c) == 1013  # try again later
                assert final(await create(a, input="a"))["status"] == "completed"
                assert final(await create(b, input="b"))["status"] == "completed"
            await until(lambda: app.state.sockets.open == 0, "the server to see both connections closed")
            async with client.responses.connect() as d:
                assert final(await create(d, input="d"))["status"] == "completed"


async def test_a_connection_ends_at_its_age_limit(settings, mock):
    async with served(settings.model_copy(update={"websocket_max_duration": 1.0})) as (_, url):
        async with sdk(url) as client:
            async with client.responses.connect() as conn:  # idle at its limit: told, then closed
                assert final(await create(conn, input="quick"))["status"] == "completed"
                err = check_error(await read_turn(conn), 429, LIMIT)
                assert "1 seconds" in err["message"] or "limit" in err["message"]
                assert await closed_with(conn) == 1000
            async with client.responses.connect() as conn:  # a turn that runs past it finishes
                assert final(await create(conn, input="[[delay=1.5]] slow"))["status"] == "completed"
                check_error(await read_turn(conn), 429, LIMIT)
                assert await closed_with(conn) == 1000


# ---------------------------------------------------------------- clients that go away


async def test_a_client_that_goes_away_stops_its_unstored_turn(client, mock):
    async with client.responses.connect() as conn:
        await conn.send({"type": "response.create", "model": MODEL, "store": False,
                         "input": "[[chunk_delay=0.2]] [[words=50]] long"})
        while json.loads(await conn.recv_bytes())["type"] != "response.output_text.delta":
            pass
    await until(lambda: mock.disconnected, "the upstream call to be dropped")


async def test_a_stored_turn_finishes_without_its_client(client, mock):
    async with client.responses.connect() as conn:
        await conn.send({"type": "response.create", "model": MODEL, "input": "[[chunk_delay=0.05]] [[words=10]] x"})
        created = json.loads(await conn.recv_bytes())
        assert created["type"] == "response.created"
    rid = created["response"]["id"]

    async def done():
        try:  # (its row is written while its first events go out: it may not be there yet)
            return (await client.responses.retrieve(rid)).status == "completed"
        except openai.NotFoundError:
            return False
    await until(done, "the stored response to complete")


@pytest.mark.e2e
def test_branchwise_serve_speaks_websocket(serve, mock, tmp_path):
    """`branchwise serve` (its protocol class and options, in its own process) upgrades
    /v1/responses to a WebSocket."""
    (tmp_path / "none.toml").write_text("")
    server = serve({"BRANCHWISE_DATABASE_URL": f"sqlite:///{tmp_path / 'bw.db'}",
                    "BRANCHWISE_UPSTREAM_BASE_URL": mock.url, "BRANCHWISE_CONFIG": str(tmp_path / "none.toml")})

    async def turn() -> dict:
        async with sdk(server.url) as client, client.responses.connect() as conn:
            return final(await create(conn, store=False, input="over a socket"))
    assert asyncio.run(turn())["output"][0]["content"][0]["text"] == "[1 messages] Echo: over a socket"
