"""Bad input is refused with OpenAI's error shape and status, and leaves no trace: no row in
any table, no request to the upstream model. Also: an upstream failure leaves the response
`failed` and the conversation as it was. Every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from branchwise.store.tables import (
    conversation_metadata,
    conversations,
    items,
    prompt_versions,
    prompts,
    responses,
)

from .helpers import check_error, check_sdk_error, new_conversation

MODEL = "mock"
MISSING_RESP = "resp_" + "0" * 48
MISSING_CONV = "conv_" + "0" * 48
MISSING_MSG = "msg_" + "0" * 48

TOO_MANY_PAIRS = {f"k{i}": "v" for i in range(17)}
LONG_KEY = {"k" * 65: "v"}
LONG_VALUE = {"k": "v" * 513}
BAD_METADATA = [
    ("17-pairs", TOO_MANY_PAIRS),
    ("key-65", LONG_KEY),
    ("value-513", LONG_VALUE),
    ("non-string-value", {"k": 1}),
    ("not-an-object", "x"),
]


async def counts(db: AsyncEngine) -> dict[str, int]:
    """Rows in each table, read from the database itself: "no trace" includes rows that no API
    would list."""
    async with db.connect() as conn:
        return {t.name: (await conn.execute(select(func.count()).select_from(t))).scalar_one()
                for t in (conversations, conversation_metadata, items, responses, prompts, prompt_versions)}


class Untouched:
    """On exit, asserts that no row was added to or removed from any table and that the model
    was never called. `case` names what is being tried, for the assertion messages."""

    def __init__(self, db: AsyncEngine, mock, case: str = ""):
        self.db, self.mock, self.case = db, mock, case

    async def __aenter__(self) -> Untouched:
        self.before = await counts(self.db)
        self.mock.clear()
        return self

    async def __aexit__(self, *exc) -> None:
        if exc[0] is None:
            assert await counts(self.db) == self.before, f"{self.case}: something was stored"
            assert self.mock.requests == [], f"{self.case}: the upstream was called"


# ---------------------------------------------------------------- POST /v1/responses


def req(**fields) -> dict[str, Any]:
    """A valid request body, with `fields` changed (a `None` value drops the field)."""
    body = {"model": MODEL, "input": "x", **fields}
    return {k: v for k, v in body.items() if v is not None}


INVALID, MISSING = "invalid_value", "missing_required_parameter"

# (case, body, param, code)
RESPONSE_CASES = [
    # wrong types
    ("temperature-str", req(temperature="hot"), "temperature", INVALID),
    ("input-int", req(input=5), "input", INVALID),
    ("metadata-str", req(metadata="x"), "metadata", INVALID),
    ("model-int", req(model=5), "model", INVALID),
    ("conversation-int", req(conversation=5), "conversation", INVALID),
    ("conversation-id-int", req(conversation={"id": 5}), "conversation.id", INVALID),
    ("stream-str", req(stream="sometimes"), "stream", INVALID),
    ("stream-yes", req(stream="yes"), "stream", INVALID),
    ("n-str", req(n="2"), "n", INVALID),
    ("store-int", req(store=1), "store", INVALID),
    ("conversation-wrong-prefix", req(conversation="abc"), "conversation", INVALID),
    ("previous-response-wrong-prefix", req(previous_response_id="abc"), "previous_response_id", INVALID),
    ("tools-str", req(tools="none"), "tools", INVALID),
    ("bad-role", req(input=[{"role": "wizard", "content": "x"}]), "input[0].role", INVALID),
    ("bad-item-type", req(input=[{"type": "bogus"}]), "input[0].type", INVALID),
    ("message-without-content", req(input=[{"role": "user"}]), "input[0].content", MISSING),
    ("part-without-text", req(input=[{"role": "user", "content": [{"type": "input_text"}]}]),
     "input[0].content[0].text", MISSING),
    ("fco-without-call-id", req(input=[{"type": "function_call_output", "output": "x"}]),
     "input[0].call_id", MISSING),
    ("unknown-text-format", req(text={"format": {"type": "yaml"}}), "text.format.type", INVALID),
    ("unknown-concurrency", req(concurrency="maybe"), "concurrency", INVALID),
    # out of range
    ("temperature-3", req(temperature=3), "temperature", INVALID),
    ("temperature-negative", req(temperature=-0.1), "temperature", INVALID),
    ("top_p-2", req(top_p=2), "top_p", INVALID),
    ("max_output_tokens-5", req(max_output_tokens=5), "max_output_tokens", INVALID),
    ("top_logprobs-21", req(top_logprobs=21), "top_logprobs", INVALID),
    ("n-9", req(n=9), "n", INVALID),
    ("n-0", req(n=0), "n", INVALID),
    # unknown and missing parameters
    ("unknown-parameter", req(frobnicate=True), "frobnicate", "unknown_parameter"),
    ("missing-model", req(model=None), "model", MISSING),
    ("empty-model", req(model=""), "model", INVALID),
    ("missing-input", req(input=None), "input", MISSING),
    ("empty-object", {}, "model", MISSING),
    # metadata limits
    ("metadata-17-pairs", req(metadata=TOO_MANY_PAIRS), "metadata", INVALID),
    ("metadata-key-65", req(metadata=LONG_KEY), "metadata", INVALID),
    ("metadata-value-513", req(metadata=LONG_VALUE), "metadata", INVALID),
    ("metadata-non-string", req(metadata={"k": 1}), "metadata.k", INVALID),
    # tools the server cannot run
    ("hosted-tool", req(tools=[{"type": "web_search"}]), "tools[0].type", "invalid_value"),
]


async def test_create_response_rejected(db_engine, raw, mock):
    for case, body, param, code in RESPONSE_CASES:
        for stream in (False, True):
            if stream and "stream" not in body:
                body = {**body, "stream": True}  # refused before any event, as plain JSON
            async with Untouched(db_engine, mock, case):
                r = await raw.post("/v1/responses", json=body)
                check_error(r, 400, param, code, case=f"{case} stream={stream}")


async def test_create_response_rejected_through_sdk(db_engine, client, mock):
    async with Untouched(db_engine, mock):
        with pytest.raises(openai.BadRequestError) as ei:
            await client.responses.create(model=MODEL, input="x", temperature="hot")
        check_sdk_error(ei.value, 400, "temperature", "invalid_value")

        with pytest.raises(openai.BadRequestError) as ei:
            await client.responses.create(model=MODEL, input="x", top_p=2)
        check_sdk_error(ei.value, 400, "top_p", "invalid_value")

        with pytest.raises(openai.BadRequestError) as ei:
            await client.responses.create(model=MODEL, input="x", max_output_tokens=5)
        check_sdk_error(ei.value, 400, "max_output_tokens", "invalid_value")

        with pytest.raises(openai.BadRequestError) as ei:
            await client.responses.create(model=MODEL, input="x", extra_body={"n": 9})
        check_sdk_error(ei.value, 400, "n", "invalid_value")

        with pytest.raises(openai.BadRequestError) as ei:
            await client.responses.create(model=MODEL, input="x", extra_body={"frobnicate": 1})
        err = check_sdk_error(ei.value, 400, "frobnicate", "unknown_parameter")
        assert "frobnicate" in err["message"]

        with pytest.raises(openai.BadRequestError) as ei:
            await client.responses.create(input="x")  # the SDK lets `model` out
        check_sdk_error(ei.value, 400, "model", "missing_required_parameter")

        with pytest.raises(openai.BadRequestError) as ei:
            await client.responses.create(model=MODEL, input="x", metadata=TOO_MANY_PAIRS)
        check_sdk_error(ei.value, 400, "metadata", "invalid_value")

        with pytest.raises(openai.BadRequestError) as ei:
            await client.responses.create(model=MODEL, input="x", stream=True, temperature=3)
        check_sdk_error(ei.value, 400, "temperature", "invalid_value")


async def test_limits_themselves_are_accepted(db_engine, client, mock):
    """The edges of every range are valid: the checks above refuse only what is past them.
    Also the control for `Untouched`: an accepted request does show up in the counts."""
    before = await counts(db_engine)
    metadata = {f"{i:02d}".ljust(64, "k"): "v" * 512 for i in range(16)}
    resp = await client.responses.create(model=MODEL, input="x", temperature=2, top_p=1,
                                         max_output_tokens=16, top_logprobs=20, metadata=metadata,
                                         extra_body={"n": 8})
    assert resp.status == "completed"
    assert resp.metadata == metadata
    assert len(resp.model_extra["alternatives"]) == 7
    sent = mock.requests[-1]
    assert sent["temperature"] == 2 and sent["top_p"] == 1 and sent["n"] == 8
    after = await counts(db_engine)
    assert after["responses"] == before["responses"] + 8  # one row per alternative
    assert after["items"] == before["items"] + 1 + 8  # one shared input, eight outputs


# ---------------------------------------------------------------- references in POST /v1/responses


async def test_previous_response_id_with_conversation(db_engine, client, mock):
    conv = await new_conversation(client, "a")
    prev = await client.responses.create(model=MODEL, input="b")
    async with Untouched(db_engine, mock):
        with pytest.raises(openai.BadRequestError) as ei:
            await client.responses.create(model=MODEL, input="c", conversation=conv.id,
                                          previous_response_id=prev.id)
        assert ei.value.param in ("previous_response_id", "conversation")
        err = check_sdk_error(ei.value, 400, ei.value.param)
        assert "previous_response_id" in err["message"] and "conversation" in err["message"]
    assert (await client.conversations.retrieve(conv.id)).model_extra["head"] == conv.model_extra["head"]


async def test_unknown_previous_response_id(db_engine, client, raw, mock):
    async with Untouched(db_engine, mock):
        with pytest.raises(openai.BadRequestError) as ei:
            await client.responses.create(model=MODEL, input="x", previous_response_id=MISSING_RESP)
        err = check_sdk_error(ei.value, 400, "previous_response_id", "previous_response_not_found")
        assert MISSING_RESP in err["message"]
        r = await raw.post("/v1/responses", json={"model": MODEL, "input": "x", "stream": True,
                                                  "previous_response_id": MISSING_RESP})
        check_error(r, 400, "previous_response_id", "previous_response_not_found")


async def test_deleted_or_unstored_previous_response_id(db_engine, client, mock):
    deleted = await client.responses.create(model=MODEL, input="x")
    await client.responses.delete(deleted.id)
    unstored = await client.responses.create(model=MODEL, input="x", store=False)
    for prev in (deleted, unstored):
        async with Untouched(db_engine, mock):
            with pytest.raises(openai.BadRequestError) as ei:
                await client.responses.create(model=MODEL, input="y", previous_response_id=prev.id)
            check_sdk_error(ei.value, 400, "previous_response_id", "previous_response_not_found")


async def test_unknown_conversation(db_engine, client, raw, mock):
    async with Untouched(db_engine, mock):
        for conversation in (MISSING_CONV, {"id": MISSING_CONV}):
            with pytest.raises(openai.NotFoundError) as ei:
                await client.responses.create(model=MODEL, input="x", conversation=conversation)
            err = check_sdk_error(ei.value, 404, "conversation")
            assert MISSING_CONV in err["message"]
        r = await raw.post("/v1/responses", json={"model": MODEL, "input": "x", "stream": True,
                                                  "conversation": MISSING_CONV})
        check_error(r, 404, "conversation")


async def test_deleted_conversation(db_engine, client, mock):
    conv = await client.conversations.create()
    await client.conversations.delete(conv.id)
    async with Untouched(db_engine, mock):
        with pytest.raises(openai.NotFoundError) as ei:
            await client.responses.create(model=MODEL, input="x", conversation=conv.id)
        check_sdk_error(ei.value, 404, "conversation")


async def _unknown_reference_errors(client, db_engine, mock) -> list[openai.APIStatusError]:
    """An unknown `item_reference` in each of the three places that take items."""
    conv = await new_conversation(client, "a")
    known = (await client.conversations.items.list(conv.id)).data[0].id
    errors = []
    async with Untouched(db_engine, mock):
        with pytest.raises(openai.APIStatusError) as ei:
            await client.responses.create(model=MODEL, input=[
                {"type": "item_reference", "id": known},
                {"type": "item_reference", "id": MISSING_MSG},
            ])
        errors.append(ei.value)
        with pytest.raises(openai.APIStatusError) as ei:
            await client.conversations.create(items=[{"type": "item_reference", "id": MISSING_MSG}])
        errors.append(ei.value)
        with pytest.raises(openai.APIStatusError) as ei:
            await client.conversations.items.create(conv.id, items=[
                {"role": "user", "content": "b"}, {"type": "item_reference", "id": MISSING_MSG},
            ])
        errors.append(ei.value)
    return errors


async def test_item_reference_to_unknown_id(db_engine, client, mock):
    resp_err, create_err, add_err = await _unknown_reference_errors(client, db_engine, mock)
    for e, param in ((resp_err, "input[1].id"), (create_err, "items[0].id"), (add_err, "items[1].id")):
        err = check_sdk_error(e, e.status_code, param)
        assert e.status_code == 404
        assert MISSING_MSG in err["message"]


async def test_item_reference_to_unknown_id_is_404(db_engine, client, mock):
    errors = await _unknown_reference_errors(client, db_engine, mock)
    assert [e.status_code for e in errors] == [404, 404, 404]
    assert all(isinstance(e, openai.NotFoundError) for e in errors)


async def test_item_reference_to_known_id_works(client, mock):
    """The control for the test above: a reference to a stored item is resolved."""
    conv = await new_conversation(client, "remember me")
    known = (await client.conversations.items.list(conv.id)).data[0].id
    resp = await client.responses.create(model=MODEL, input=[{"type": "item_reference", "id": known}])
    assert resp.output_text == "[1 messages] Echo: remember me"


# ---------------------------------------------------------------- conversations


def _msgs(k: int) -> list[dict]:
    return [{"role": "user", "content": f"m{i}"} for i in range(k)]


CONVERSATION_CASES = [
    ("21-items", {"items": _msgs(21)}, "items", "invalid_value"),
    ("items-str", {"items": "hello"}, "items", "invalid_value"),
    ("bad-role", {"items": [{"role": "wizard", "content": "x"}]}, "items[0].role", "invalid_value"),
    ("bad-4th-item", {"items": [*_msgs(3), {"type": "function_call", "name": "f"}]}, "items[3].call_id",
     "missing_required_parameter"),
    ("metadata-17-pairs", {"metadata": TOO_MANY_PAIRS}, "metadata", "invalid_value"),
    ("metadata-key-65", {"metadata": LONG_KEY}, "metadata", "invalid_value"),
    ("metadata-value-513", {"metadata": LONG_VALUE}, "metadata", "invalid_value"),
    ("metadata-non-string", {"metadata": {"k": 1}}, "metadata.k", "invalid_value"),
    ("metadata-str", {"metadata": "x"}, "metadata", "invalid_value"),
    ("unknown-parameter", {"items": _msgs(1), "title": "x"}, "title", "unknown_parameter"),
]


async def test_create_conversation_rejected(db_engine, raw, mock):
    for case, body, param, code in CONVERSATION_CASES:
        async with Untouched(db_engine, mock, case):
            r = await raw.post("/v1/conversations", json=body)
            check_error(r, 400, param, code, case=case)


async def test_create_conversation_rejected_through_sdk(db_engine, client, mock):
    async with Untouched(db_engine, mock):
        with pytest.raises(openai.BadRequestError) as ei:
            await client.conversations.create(items=_msgs(21))
        check_sdk_error(ei.value, 400, "items", "invalid_value")
        for metadata in (TOO_MANY_PAIRS, LONG_KEY, LONG_VALUE):
            with pytest.raises(openai.BadRequestError) as ei:
                await client.conversations.create(metadata=metadata, items=_msgs(2))
            check_sdk_error(ei.value, 400, "metadata", "invalid_value")


async def test_update_conversation_rejected(db_engine, client, raw, mock):
    conv = await client.conversations.create(metadata={"keep": "me"})
    for case, metadata in BAD_METADATA:
        async with Untouched(db_engine, mock, case):
            r = await raw.post(f"/v1/conversations/{conv.id}", json={"metadata": metadata})
            param = "metadata.k" if metadata == {"k": 1} else "metadata"
            err = check_error(r, 400, param, "invalid_value", case=case)
            assert "metadata" in err["message"]
            if isinstance(metadata, dict):
                with pytest.raises(openai.BadRequestError) as ei:
                    await client.conversations.update(conv.id, metadata=metadata)
                check_sdk_error(ei.value, 400, param, "invalid_value")
        assert (await client.conversations.retrieve(conv.id)).metadata == {"keep": "me"}, case


async def test_update_conversation_other_bad_bodies(db_engine, client, raw, mock):
    conv = await client.conversations.create(metadata={"keep": "me"})
    async with Untouched(db_engine, mock):
        r = await raw.post(f"/v1/conversations/{conv.id}", json={})
        check_error(r, 400, "metadata", "missing_required_parameter")
        r = await raw.post(f"/v1/conversations/{conv.id}", json={"metadata": {}, "items": []})
        check_error(r, 400, "items", "unknown_parameter")
    assert (await client.conversations.retrieve(conv.id)).metadata == {"keep": "me"}


ADD_ITEMS_CASES = [
    ("21-items", {"items": _msgs(21)}, "items", "invalid_value"),
    ("missing-items", {}, "items", "missing_required_parameter"),
    ("items-object", {"items": {"role": "user", "content": "x"}}, "items", "invalid_value"),
    ("content-int", {"items": [*_msgs(2), {"role": "user", "content": 7}]}, "items[2].content",
     "invalid_value"),
    ("unknown-parameter", {"items": _msgs(1), "metadata": {}}, "metadata", "unknown_parameter"),
]


async def test_add_items_rejected(db_engine, client, raw, mock):
    conv = await client.conversations.create(items=_msgs(2))
    head = conv.model_extra["head"]
    for case, body, param, code in ADD_ITEMS_CASES:
        async with Untouched(db_engine, mock, case):
            r = await raw.post(f"/v1/conversations/{conv.id}/items", json=body)
            check_error(r, 400, param, code, case=case)
        assert (await client.conversations.retrieve(conv.id)).model_extra["head"] == head, case


async def test_add_items_rejected_through_sdk(db_engine, client, mock):
    conv = await client.conversations.create(items=_msgs(2))
    async with Untouched(db_engine, mock):
        with pytest.raises(openai.BadRequestError) as ei:
            await client.conversations.items.create(conv.id, items=_msgs(21))
        check_sdk_error(ei.value, 400, "items", "invalid_value")
        with pytest.raises(openai.NotFoundError) as ei:
            await client.conversations.items.create(MISSING_CONV, items=_msgs(1))
        check_sdk_error(ei.value, 404, None)
    page = await client.conversations.items.list(conv.id)
    assert len(page.data) == 2


# ---------------------------------------------------------------- bodies that are not JSON objects


def _routes(conv_id: str) -> list[str]:
    return ["/v1/responses", "/v1/conversations", f"/v1/conversations/{conv_id}",
            f"/v1/conversations/{conv_id}/items"]


NOT_JSON_OBJECTS = [b"{not json", b'{"model": "mock", "input": "x"', b"\xff\xfe", b"[1, 2]", b'"text"',
                    b"null", b"42"]


async def test_malformed_json(db_engine, client, raw, mock):
    conv = await client.conversations.create(items=_msgs(1), metadata={"keep": "me"})
    for content in NOT_JSON_OBJECTS:
        for route in _routes(conv.id):
            case = f"{route} {content!r}"
            async with Untouched(db_engine, mock, case):
                r = await raw.post(route, content=content, headers={"content-type": "application/json"})
                check_error(r, 400, None, "invalid_json", case=case)
    assert (await client.conversations.retrieve(conv.id)).metadata == {"keep": "me"}


async def test_wrong_content_type(db_engine, client, raw, mock):
    """A body that would be valid JSON, sent as something else, is refused unread."""
    conv = await client.conversations.create(items=_msgs(1), metadata={"keep": "me"})
    bodies = {
        "/v1/responses": b'{"model": "mock", "input": "x"}',
        "/v1/conversations": b'{"items": [{"role": "user", "content": "x"}]}',
        f"/v1/conversations/{conv.id}": b'{"metadata": {"changed": "yes"}}',
        f"/v1/conversations/{conv.id}/items": b'{"items": [{"role": "user", "content": "x"}]}',
    }
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        for route, content in bodies.items():
            case = f"{route} {ctype}"
            async with Untouched(db_engine, mock, case):
                r = await raw.post(route, content=content, headers={"content-type": ctype})
                err = check_error(r, 400, None, "unsupported_content_type", case=case)
                assert ctype in err["message"]
    assert (await client.conversations.retrieve(conv.id)).metadata == {"keep": "me"}


async def test_json_content_type_variants_are_accepted(client, raw):
    r = await raw.post("/v1/conversations", content=b'{"metadata": {"a": "b"}}',
                       headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200 and r.json()["metadata"] == {"a": "b"}


# ---------------------------------------------------------------- paging parameters


BAD_PAGING = [
    ("limit-0", {"limit": "0"}, "limit"),
    ("limit-101", {"limit": "101"}, "limit"),
    ("limit-negative", {"limit": "-1"}, "limit"),
    ("limit-word", {"limit": "ten"}, "limit"),
    ("limit-float", {"limit": "1.5"}, "limit"),
    ("order-sideways", {"order": "sideways"}, "order"),
    ("order-upper", {"order": "ASC"}, "order"),
]


async def test_bad_paging(db_engine, client, raw, mock):
    conv = await client.conversations.create(items=_msgs(2))
    resp = await client.responses.create(model=MODEL, input="x")
    for case, params, param in BAD_PAGING:
        for route in (f"/v1/conversations/{conv.id}/items", f"/v1/responses/{resp.id}/input_items"):
            async with Untouched(db_engine, mock, case):
                r = await raw.get(route, params=params)
                check_error(r, 400, param, "invalid_value", case=f"{route} {case}")


async def test_bad_paging_through_sdk(db_engine, client, mock):
    conv = await client.conversations.create(items=_msgs(2))
    resp = await client.responses.create(model=MODEL, input="x")
    async with Untouched(db_engine, mock):
        for kw, param in (({"limit": 0}, "limit"), ({"limit": 101}, "limit"),
                          ({"order": "sideways"}, "order")):
            with pytest.raises(openai.BadRequestError) as ei:
                await client.conversations.items.list(conv.id, **kw)
            check_sdk_error(ei.value, 400, param, "invalid_value")
            with pytest.raises(openai.BadRequestError) as ei:
                await client.responses.input_items.list(resp.id, **kw)
            check_sdk_error(ei.value, 400, param, "invalid_value")
        # an `after` that is not in the list
        with pytest.raises(openai.NotFoundError) as ei:
            await client.conversations.items.list(conv.id, after=MISSING_MSG)
        check_sdk_error(ei.value, 404, None)
        with pytest.raises(openai.NotFoundError) as ei:
            await client.responses.input_items.list(resp.id, after=MISSING_MSG)
        check_sdk_error(ei.value, 404, None)
    # the edges are fine
    assert len((await client.conversations.items.list(conv.id, limit=1)).data) == 1
    assert len((await client.conversations.items.list(conv.id, limit=100)).data) == 2


async def test_unknown_route_and_method(db_engine, raw, mock):
    async with Untouched(db_engine, mock):
        r = await raw.post("/v1/nothing-here", json={})
        check_error(r, 404, None)
        r = await raw.put("/v1/responses", json={"model": MODEL, "input": "x"})
        check_error(r, 405, None)
        r = await raw.patch("/v1/conversations", json={})
        check_error(r, 405, None)


# ---------------------------------------------------------------- upstream failure


async def test_upstream_failure_leaves_conversation_unchanged(client, mock):
    conv = await new_conversation(client, "hello")
    ok = await client.responses.create(model=MODEL, conversation=conv.id, input="first")
    assert ok.status == "completed"
    before_items = [it.id async for it in client.conversations.items.list(conv.id, order="asc")]
    head = (await client.conversations.retrieve(conv.id)).model_extra["head"]
    assert head == ok.output[0].id == before_items[-1]

    mock.clear()
    failed = await client.responses.create(model=MODEL, conversation=conv.id, input="boom [[fail=500]]")
    assert len(mock.requests) == 1  # the upstream was asked once, with the whole history
    assert [m["content"] for m in mock.requests[0]["messages"]] == [
        "hello", "first", "[2 messages] Echo: first", "boom [[fail=500]]"
    ]
    assert failed.status == "failed"
    assert failed.error is not None
    # OpenAI's ResponseErrorCode enum has no upstream codes: the SDK's types allow only its values
    assert failed.error.code == "server_error"
    assert "500" in failed.error.message
    assert failed.output == []
    assert failed.usage is None
    assert failed.conversation is not None and failed.conversation.id == conv.id

    got = await client.responses.retrieve(failed.id)
    assert got.status == "failed" and got.error.code == "server_error"
    assert got.model_dump() == failed.model_dump()

    after = await client.conversations.retrieve(conv.id)
    assert after.model_extra["head"] == head
    assert [it.id async for it in client.conversations.items.list(conv.id, order="asc")] == before_items

    # the next turn builds on the old head: the failed input is not in its history
    mock.clear()
    nxt = await client.responses.create(model=MODEL, conversation=conv.id, input="second")
    assert nxt.status == "completed"
    assert nxt.output_text == "[4 messages] Echo: second"
    assert [m["content"] for m in mock.requests[0]["messages"]] == [
        "hello", "first", "[2 messages] Echo: first", "second"
    ]


async def test_upstream_failure_streaming(client, mock):
    conv = await new_conversation(client, "hello")
    head = conv.model_extra["head"]
    stream = await client.responses.create(model=MODEL, conversation=conv.id, input="boom [[fail=503]]",
                                           stream=True)
    events = [ev async for ev in stream]
    assert events[0].type == "response.created"
    assert events[-1].type == "response.failed"
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "server_error"
    assert "503" in failed.error.message
    assert [e.sequence_number for e in events] == list(range(len(events)))

    got = await client.responses.retrieve(failed.id)
    assert got.status == "failed" and got.error.code == "server_error"
    assert (await client.conversations.retrieve(conv.id)).model_extra["head"] == head
    assert [it.id async for it in client.conversations.items.list(conv.id)] == [head]
