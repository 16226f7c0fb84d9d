"""The Conversations API through the official SDK: objects, items, paging, and responses that
append to a conversation. Every test runs on SQLite and on PostgreSQL (see conftest)."""

from __future__ import annotations

import re

import openai
import pytest

from .helpers import MODEL, check_sdk_error, new_conversation

ID_RE = re.compile(r"^(conv|msg|resp)_[0-9a-f]{48}$")


def texts(items) -> list[str]:
    """The text of each message item, in the given order."""
    out = []
    for it in items:
        assert it.type == "message"
        out.append("".join(getattr(p, "text", None) or getattr(p, "refusal", "") for p in it.content))
    return out


async def all_items(client: openai.AsyncOpenAI, conv_id: str, **kw) -> list:
    return [it async for it in client.conversations.items.list(conv_id, **kw)]


# ---------------------------------------------------------------- conversation object


async def test_create_empty_conversation(client):
    conv = await client.conversations.create()
    assert ID_RE.match(conv.id) and conv.id.startswith("conv_")
    assert conv.object == "conversation"
    assert isinstance(conv.created_at, int) and conv.created_at > 1_600_000_000
    assert conv.metadata == {}
    # branchwise extensions come back as extra attributes
    assert conv.model_extra == {"head": None, "forked_from": None}
    assert conv.head is None
    assert conv.forked_from is None
    page = await client.conversations.items.list(conv.id)
    assert page.data == [] and page.has_more is False and page.last_id is None


async def test_create_with_metadata_retrieve_update(client):
    conv = await client.conversations.create(metadata={"topic": "demo", "owner": "ana"})
    assert conv.metadata == {"topic": "demo", "owner": "ana"}

    got = await client.conversations.retrieve(conv.id)
    assert got.id == conv.id
    assert got.created_at == conv.created_at
    assert got.metadata == {"topic": "demo", "owner": "ana"}

    upd = await client.conversations.update(conv.id, metadata={"topic": "changed"})
    assert upd.id == conv.id
    assert upd.metadata == {"topic": "changed"}  # replaced, not merged
    assert (await client.conversations.retrieve(conv.id)).metadata == {"topic": "changed"}

    # 16 pairs, 64-char keys and 512-char values are the limits, and allowed
    full = {f"{i:02d}".ljust(64, "k"): "v" * 512 for i in range(16)}
    upd = await client.conversations.update(conv.id, metadata=full)
    assert upd.metadata == full


async def test_create_with_items_of_every_shape(client, mock):
    # An assistant message exactly as the SDK returns it from a response: output_text parts
    # carrying annotations and logprobs, plus id and status.
    resp = await client.responses.create(model=MODEL, input="seed", store=False)
    returned = resp.output[0].model_dump()
    assert returned["content"][0]["annotations"] == [] and "logprobs" in returned["content"][0]
    mock.clear()

    items = [
        {"role": "developer", "content": "be terse"},  # easy message
        {"role": "user", "content": "hello"},  # easy message
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "full"},
                                                        {"type": "input_text", "text": "item"}]},
        returned,
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "noted", "annotations": [], "logprobs": []}]},
    ]
    conv = await client.conversations.create(items=items, metadata={"k": "v"})
    listed = await all_items(client, conv.id, order="asc")
    assert [it.role for it in listed] == ["developer", "user", "user", "assistant", "assistant"]
    assert texts(listed) == ["be terse", "hello", "fullitem", "[1 messages] Echo: seed", "noted"]
    assert listed[0].content[0].type == "input_text"
    assert [p.text for p in listed[2].content] == ["full", "item"]
    assert listed[3].content[0].type == "output_text"
    assert listed[3].content[0].annotations == []
    assert listed[4].content[0].logprobs == []
    for it in listed:
        assert it.id.startswith("msg_") and ID_RE.match(it.id)
        assert it.status == "completed"
    # a re-sent item gets a fresh id: ids name nodes' content, never shared across requests
    assert listed[3].id != returned["id"]
    assert len({it.id for it in listed}) == 5
    assert conv.model_extra["head"] == listed[-1].id
    assert mock.requests == []  # creating a conversation never calls the model


async def test_create_with_twenty_items(client):
    items = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"} for i in range(20)]
    conv = await client.conversations.create(items=items)
    listed = await all_items(client, conv.id, order="asc")
    assert texts(listed) == [f"m{i}" for i in range(20)]
    assert conv.head == listed[-1].id


async def test_delete_conversation(client):
    conv = await new_conversation(client, "first")
    resp = await client.responses.create(model=MODEL, conversation=conv.id, input="second")
    assert resp.status == "completed"

    deleted = await client.conversations.delete(conv.id)
    assert deleted.id == conv.id
    assert deleted.object == "conversation.deleted"
    assert deleted.deleted is True

    with pytest.raises(openai.NotFoundError) as ei:
        await client.conversations.retrieve(conv.id)
    err = check_sdk_error(ei.value, 404)
    assert conv.id in err["message"]
    with pytest.raises(openai.NotFoundError):
        await client.conversations.items.list(conv.id)
    with pytest.raises(openai.NotFoundError):
        await client.conversations.delete(conv.id)

    # the response and its items outlive the conversation
    again = await client.responses.retrieve(resp.id)
    assert again.id == resp.id and again.status == "completed"
    inputs = [it async for it in client.responses.input_items.list(resp.id, order="asc")]
    assert texts(inputs) == ["second"]
    assert texts(again.output) == ["[2 messages] Echo: second"]


# ---------------------------------------------------------------- items


async def test_items_create_returns_list_and_appends(client):
    conv = await new_conversation(client, "a")
    created = await client.conversations.items.create(
        conv.id,
        items=[
            {"role": "assistant", "content": "b"},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "c"}]},
        ],
    )
    assert created.object == "list"
    assert texts(created.data) == ["b", "c"]
    assert created.first_id == created.data[0].id
    assert created.last_id == created.data[1].id
    assert created.has_more is False

    listed = await all_items(client, conv.id, order="asc")
    assert texts(listed) == ["a", "b", "c"]
    assert [it.id for it in listed[1:]] == [it.id for it in created.data]
    got = await client.conversations.retrieve(conv.id)
    assert got.head == created.data[-1].id


async def test_items_list_limit_order_after(client):
    conv = await new_conversation(client, *(f"m{i}" for i in range(5)))
    asc = await client.conversations.items.list(conv.id, order="asc")
    ids = [it.id for it in asc.data]
    assert texts(asc.data) == ["m0", "m1", "m2", "m3", "m4"]
    assert asc.first_id == ids[0] and asc.last_id == ids[-1] and asc.has_more is False

    default = await client.conversations.items.list(conv.id)  # desc is the default
    assert [it.id for it in default.data] == ids[::-1]
    desc = await client.conversations.items.list(conv.id, order="desc")
    assert [it.id for it in desc.data] == ids[::-1]

    page = await client.conversations.items.list(conv.id, limit=2)
    assert [it.id for it in page.data] == [ids[4], ids[3]]
    assert page.has_more is True and page.first_id == ids[4] and page.last_id == ids[3]

    page = await client.conversations.items.list(conv.id, limit=2, after=ids[3])
    assert [it.id for it in page.data] == [ids[2], ids[1]]
    assert page.has_more is True

    page = await client.conversations.items.list(conv.id, limit=2, after=ids[1])
    assert [it.id for it in page.data] == [ids[0]]
    assert page.has_more is False

    page = await client.conversations.items.list(conv.id, limit=2, order="asc", after=ids[1])
    assert [it.id for it in page.data] == [ids[2], ids[3]]
    assert page.has_more is True

    page = await client.conversations.items.list(conv.id, limit=3, order="asc", after=ids[1])
    assert [it.id for it in page.data] == [ids[2], ids[3], ids[4]]
    assert page.has_more is False

    page = await client.conversations.items.list(conv.id, order="asc", after=ids[4])
    assert page.data == [] and page.has_more is False
    page = await client.conversations.items.list(conv.id, after=ids[0])
    assert page.data == [] and page.has_more is False

    page = await client.conversations.items.list(conv.id, limit=5, order="asc")
    assert len(page.data) == 5 and page.has_more is False


@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_auto_pagination_limit_1(client, order):
    items = [{"role": "user", "content": f"m{i}"} for i in range(7)]
    conv = await client.conversations.create(items=items)
    await client.conversations.items.create(conv.id, items=[{"role": "assistant", "content": "m7"}])
    expected = [f"m{i}" for i in range(8)]
    if order == "desc":
        expected.reverse()

    seen = [it async for it in client.conversations.items.list(conv.id, limit=1, order=order)]
    assert texts(seen) == expected

    # page by page: one item each, has_more until the last
    page = await client.conversations.items.list(conv.id, limit=1, order=order)
    pages = 1
    while page.has_next_page():
        assert len(page.data) == 1 and page.has_more is True
        page = await page.get_next_page()
        pages += 1
    assert pages == 8 and page.has_more is False and len(page.data) == 1


async def test_items_retrieve(client):
    conv = await client.conversations.create(
        items=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    )
    listed = await all_items(client, conv.id, order="asc")
    for it in listed:
        got = await client.conversations.items.retrieve(it.id, conversation_id=conv.id)
        assert got.model_dump() == it.model_dump()
    got = await client.conversations.items.retrieve(listed[1].id, conversation_id=conv.id)
    assert got.type == "message" and got.role == "assistant"
    assert got.content[0].type == "output_text" and got.content[0].text == "hello"


async def test_item_delete_returns_conversation(client):
    conv = await client.conversations.create(
        items=[{"role": "user", "content": f"m{i}"} for i in range(4)], metadata={"x": "1"}
    )
    ids = [it.id for it in await all_items(client, conv.id, order="asc")]

    # an item in the middle: the ones below it stay, in order, with their ids
    got = await client.conversations.items.delete(ids[1], conversation_id=conv.id)
    assert got.object == "conversation"
    assert got.id == conv.id and got.metadata == {"x": "1"}
    after = await all_items(client, conv.id, order="asc")
    assert [it.id for it in after] == [ids[0], ids[2], ids[3]]
    assert texts(after) == ["m0", "m2", "m3"]
    assert got.head == ids[3]
    with pytest.raises(openai.NotFoundError) as ei:
        await client.conversations.items.retrieve(ids[1], conversation_id=conv.id)
    check_sdk_error(ei.value, 404)

    # the last item: the head moves up
    got = await client.conversations.items.delete(ids[3], conversation_id=conv.id)
    assert got.head == ids[2]
    assert texts(await all_items(client, conv.id, order="asc")) == ["m0", "m2"]

    # the first item
    got = await client.conversations.items.delete(ids[0], conversation_id=conv.id)
    assert texts(await all_items(client, conv.id, order="asc")) == ["m2"]
    assert got.head == ids[2]

    # deleting it again is a 404
    with pytest.raises(openai.NotFoundError) as ei:
        await client.conversations.items.delete(ids[0], conversation_id=conv.id)
    check_sdk_error(ei.value, 404)

    # everything: the conversation is empty and still usable
    got = await client.conversations.items.delete(ids[2], conversation_id=conv.id)
    assert got.head is None
    assert await all_items(client, conv.id) == []
    await client.conversations.items.create(conv.id, items=[{"role": "user", "content": "again"}])
    assert texts(await all_items(client, conv.id)) == ["again"]


async def test_deleted_item_leaves_model_context(client, mock):
    conv = await client.conversations.create(
        items=[{"role": "user", "content": "keep"}, {"role": "user", "content": "drop"}]
    )
    drop = (await client.conversations.items.list(conv.id, limit=1)).data[0]
    await client.conversations.items.delete(drop.id, conversation_id=conv.id)
    resp = await client.responses.create(model=MODEL, conversation=conv.id, input="next")
    assert mock.requests[-1]["messages"] == [
        {"role": "user", "content": "keep"}, {"role": "user", "content": "next"}
    ]
    assert resp.output_text == "[2 messages] Echo: next"


# ---------------------------------------------------------------- responses on a conversation


async def test_response_appends_to_conversation(client, mock):
    conv = await client.conversations.create(
        items=[{"role": "system", "content": "sys"}, {"role": "user", "content": "one"},
               {"role": "assistant", "content": "uno"}]
    )
    resp = await client.responses.create(model=MODEL, conversation=conv.id, input="two")
    assert resp.status == "completed"
    assert resp.conversation is not None and resp.conversation.id == conv.id
    assert resp.output_text == "[4 messages] Echo: two"
    assert mock.requests[-1]["messages"] == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "uno"},
        {"role": "user", "content": "two"},
    ]

    listed = await all_items(client, conv.id, order="asc")
    assert texts(listed) == ["sys", "one", "uno", "two", "[4 messages] Echo: two"]
    assert listed[-1].id == resp.output[0].id
    got = await client.conversations.retrieve(conv.id)
    assert got.head == resp.output[0].id

    # `conversation` as an object, and a list input of two messages
    resp2 = await client.responses.create(
        model=MODEL, conversation={"id": conv.id},
        input=[{"role": "user", "content": "three"},
               {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "four"}]}],
    )
    assert resp2.output_text == "[7 messages] Echo: four"
    msgs = mock.requests[-1]["messages"]
    assert [m["content"] for m in msgs] == ["sys", "one", "uno", "two", "[4 messages] Echo: two",
                                            "three", "four"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user", "user"]
    listed = await all_items(client, conv.id, order="asc")
    assert texts(listed)[5:] == ["three", "four", "[7 messages] Echo: four"]
    assert (await client.conversations.retrieve(conv.id)).head == resp2.output[0].id
    desc = await all_items(client, conv.id)
    assert [it.id for it in desc] == [it.id for it in reversed(listed)]

    # the response's input items are just its own input, newest first by default
    inputs = [it async for it in client.responses.input_items.list(resp2.id)]
    assert texts(inputs) == ["four", "three"]


async def test_items_added_then_response_sees_them(client, mock):
    conv = await client.conversations.create()
    await client.conversations.items.create(conv.id, items=[{"role": "user", "content": "context"}])
    resp = await client.responses.create(model=MODEL, conversation=conv.id, input="q")
    assert resp.output_text == "[2 messages] Echo: q"
    assert [m["content"] for m in mock.requests[-1]["messages"]] == ["context", "q"]
    # and an item added after the response lands after its output
    await client.conversations.items.create(conv.id, items=[{"role": "user", "content": "later"}])
    assert texts(await all_items(client, conv.id, order="asc")) == [
        "context", "q", "[2 messages] Echo: q", "later"
    ]


# ---------------------------------------------------------------- unknown ids


async def test_unknown_conversation_is_404(client):
    missing = "conv_" + "0" * 48
    calls = [
        client.conversations.retrieve(missing),
        client.conversations.update(missing, metadata={"a": "b"}),
        client.conversations.delete(missing),
        client.conversations.items.list(missing),
        client.conversations.items.create(missing, items=[{"role": "user", "content": "x"}]),
        client.conversations.items.retrieve("msg_" + "0" * 48, conversation_id=missing),
        client.conversations.items.delete("msg_" + "0" * 48, conversation_id=missing),
    ]
    for call in calls:
        with pytest.raises(openai.NotFoundError) as ei:
            await call
        err = check_sdk_error(ei.value, 404)
        assert missing in err["message"]


async def test_unknown_item_is_404(client):
    conv = await new_conversation(client, "x")
    other = await new_conversation(client, "y")
    foreign = (await client.conversations.items.list(other.id)).data[0].id
    for item_id in ("msg_" + "f" * 48, foreign):  # unknown, and an item of another conversation
        with pytest.raises(openai.NotFoundError) as ei:
            await client.conversations.items.retrieve(item_id, conversation_id=conv.id)
        err = check_sdk_error(ei.value, 404)
        assert item_id in err["message"]
        with pytest.raises(openai.NotFoundError) as ei:
            await client.conversations.items.delete(item_id, conversation_id=conv.id)
        check_sdk_error(ei.value, 404)
        with pytest.raises(openai.NotFoundError) as ei:
            await client.conversations.items.list(conv.id, after=item_id)
        check_sdk_error(ei.value, 404)
    # neither conversation changed
    assert texts(await all_items(client, conv.id)) == ["x"]
    assert texts(await all_items(client, other.id)) == ["y"]
