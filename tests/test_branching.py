"""Fork, head, tree, n alternatives and item deletion, through the official SDK, on SQLite and
PostgreSQL."""

from __future__ import annotations

import openai
import pytest

from branchwise.settings import Settings

from .helpers import serving


def msg(text: str, role: str = "user") -> dict:
    return {"type": "message", "role": role, "content": text}


async def texts(client, conv_id: str) -> list[str]:
    return [it.content[0].text async for it in client.conversations.items.list(conv_id, order="asc", limit=100)]


async def fork(raw, conv_id: str, **body) -> dict:
    r = await raw.post(f"/v1/conversations/{conv_id}/fork", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def tree(raw, conv_id: str, **params) -> dict:
    r = await raw.get(f"/v1/conversations/{conv_id}/tree", params=params)
    assert r.status_code == 200, r.text
    return r.json()


async def test_fork_at_head_copies_nothing_and_diverges(client, raw, mock):
    conv = await client.conversations.create(items=[msg("a"), msg("b")])
    first = await client.responses.create(model="m", conversation=conv.id, input="c")
    f = await fork(raw, conv.id, metadata={"branch": "A"})
    assert f["id"].startswith("conv_") and f["id"] != conv.id
    assert f["object"] == "conversation"
    assert f["metadata"] == {"branch": "A"}
    assert f["head"] == first.output[-1].id
    assert f["forked_from"] == {"conversation_id": conv.id, "item_id": first.output[-1].id}
    # the SDK reads the fork like any conversation
    fc = await client.conversations.retrieve(f["id"])
    assert fc.model_extra["forked_from"]["conversation_id"] == conv.id
    # same history, the same item ids: nothing was copied
    src_ids = [it.id async for it in client.conversations.items.list(conv.id, order="asc")]
    fork_ids = [it.id async for it in client.conversations.items.list(f["id"], order="asc")]
    assert src_ids == fork_ids
    # both continue independently, at once
    ra = await client.responses.create(model="m", conversation=conv.id, input="on source")
    rb = await client.responses.create(model="m", conversation=f["id"], input="on fork")
    assert len(mock.requests[-2]["messages"]) == len(mock.requests[-1]["messages"]) == 5
    assert await texts(client, conv.id) == ["a", "b", "c", first.output_text, "on source", ra.output_text]
    assert await texts(client, f["id"]) == ["a", "b", "c", first.output_text, "on fork", rb.output_text]
    # one tree, both branches in it
    t = await tree(raw, f["id"])
    assert {n["id"] for n in t["data"]} >= set(src_ids) | {ra.output[-1].id, rb.output[-1].id}


async def test_fork_at_an_item_and_bad_items(client, raw):
    conv = await client.conversations.create(items=[msg("1"), msg("2"), msg("3"), msg("4")])
    ids = [it.id async for it in client.conversations.items.list(conv.id, order="asc")]
    f = await fork(raw, conv.id, item_id=ids[1])
    assert f["head"] == ids[1]
    assert await texts(client, f["id"]) == ["1", "2"]
    assert await texts(client, conv.id) == ["1", "2", "3", "4"]
    r = await raw.post(f"/v1/conversations/{conv.id}/fork", json={"item_id": "msg_nope"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "item_id"
    r = await raw.post("/v1/conversations/conv_nope/fork", json={})
    assert r.status_code == 404
    r = await raw.post(f"/v1/conversations/{conv.id}/fork", json={"item_id": 5})
    assert r.status_code == 400
    # an item of the tree that is not on this conversation's path is refused too
    other = await client.conversations.create(items=[msg("x")])
    other_id = (await client.conversations.retrieve(other.id)).model_extra["head"]
    r = await raw.post(f"/v1/conversations/{conv.id}/fork", json={"item_id": other_id})
    assert r.status_code == 400


async def test_fork_at_item_1000_of_2000(client, raw, mock):
    conv = await client.conversations.create(items=[msg("m0")])
    for k in range(1, 2000, 20):
        batch = [msg(f"m{j}") for j in range(k, min(k + 20, 2000))]
        await client.conversations.items.create(conv.id, items=batch)
    page = await client.conversations.items.list(conv.id, order="asc", limit=100,
                                                 after=None)
    assert page.data[0].content[0].text == "m0"
    # find the 1,000th item (index 999) by paging
    ids = [it.id async for it in client.conversations.items.list(conv.id, order="asc", limit=100)]
    assert len(ids) == 2000
    f = await fork(raw, conv.id, item_id=ids[999])
    fork_ids = [it.id async for it in client.conversations.items.list(f["id"], order="asc", limit=100)]
    assert fork_ids == ids[:1000]
    r = await client.responses.create(model="m", conversation=f["id"], input="next")
    assert len(mock.requests[-1]["messages"]) == 1001
    assert r.output_text == "[1001 messages] Echo: next"
    # the source is untouched
    assert [it.id async for it in client.conversations.items.list(conv.id, order="asc", limit=100)] == ids
    assert (await client.conversations.retrieve(conv.id)).model_extra["head"] == ids[-1]


async def test_head_moves_anywhere_in_the_tree(client, raw, mock):
    conv = await client.conversations.create(items=[msg("q")])
    r1 = await client.responses.create(model="m", conversation=conv.id, input="one")
    r2 = await client.responses.create(model="m", conversation=conv.id, input="two")
    # go back to r1's answer: the list and the next response follow the head
    r = await raw.post(f"/v1/conversations/{conv.id}/head", json={"item_id": r1.output[-1].id})
    assert r.status_code == 200 and r.json()["head"] == r1.output[-1].id
    assert await texts(client, conv.id) == ["q", "one", r1.output_text]
    r3 = await client.responses.create(model="m", conversation=conv.id, input="three")
    assert len(mock.requests[-1]["messages"]) == 4
    # r2's branch is still in the tree and reachable
    r = await raw.post(f"/v1/conversations/{conv.id}/head", json={"item_id": r2.output[-1].id})
    assert r.status_code == 200
    assert await texts(client, conv.id) == ["q", "one", r1.output_text, "two", r2.output_text]
    t = await tree(raw, conv.id)
    assert t["head"] == r2.output[-1].id
    parents = {n["id"]: n["parent_id"] for n in t["data"]}
    assert parents[r3.output[-1].id] != parents[r2.output[-1].id]
    # bad input
    r = await raw.post(f"/v1/conversations/{conv.id}/head", json={"item_id": "msg_unknown"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "item_id"
    r = await raw.post(f"/v1/conversations/{conv.id}/head", json={})
    assert r.status_code == 400 and r.json()["error"]["param"] == "item_id"
    r = await raw.post("/v1/conversations/conv_nope/head", json={"item_id": r1.output[-1].id})
    assert r.status_code == 404
    other = await client.conversations.create(items=[msg("elsewhere")])
    other_item = [it.id async for it in client.conversations.items.list(other.id)][0]
    r = await raw.post(f"/v1/conversations/{conv.id}/head", json={"item_id": other_item})
    assert r.status_code == 400 and r.json()["error"]["code"] == "item_not_found"
    # none of the refused moves moved anything; the reply of a move is the conversation object
    assert (await client.conversations.retrieve(conv.id)).model_extra["head"] == r2.output[-1].id
    r = await raw.post(f"/v1/conversations/{conv.id}/head", json={"item_id": r2.output[-1].id})
    assert r.json() == (await raw.get(f"/v1/conversations/{conv.id}")).json()


async def test_tree_pages(client, raw):
    conv = await client.conversations.create(items=[msg(str(i)) for i in range(7)])
    full = await tree(raw, conv.id)
    assert full["object"] == "conversation.tree"
    assert len(full["data"]) == 7 and full["has_more"] is False
    node = full["data"][3]
    assert set(node) == {"id", "parent_id", "type", "role", "response_id", "status", "created_at"}
    assert node["parent_id"] == full["data"][2]["id"] and full["data"][0]["parent_id"] is None
    seen, after = [], None
    for _ in range(len(full["data"])):  # 3 pages; one per node at most, or the paging loops
        params = {"limit": 3, **({"after": after} if after else {})}
        page = await tree(raw, conv.id, **params)
        seen += [n["id"] for n in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    else:
        pytest.fail(f"tree paging did not end after {len(full['data'])} pages: {seen}")
    assert seen == [n["id"] for n in full["data"]]
    for bad in ({"limit": 0}, {"limit": 1001}, {"limit": "x"}):
        r = await raw.get(f"/v1/conversations/{conv.id}/tree", params=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == "limit"


async def _page_all(raw, conv_id: str, limit: int, most: int) -> list[dict]:
    rows, after = [], None
    for _ in range(most):
        page = await tree(raw, conv_id, limit=limit, **({"after": after} if after else {}))
        rows += page["data"]
        if not page["has_more"]:
            return rows
        after = page["last_id"]
    pytest.fail(f"tree paging did not end after {most} pages: {[r['id'] for r in rows]}")


async def test_tree_pages_every_row_once_after_a_delete(client, raw):
    """Deleting an item re-hangs the items below it as copies with the same ids: the tree then
    holds item ids twice, and paging must still give every row exactly once."""
    conv = await client.conversations.create(items=[msg(str(i)) for i in range(10)])
    ids = [it.id async for it in client.conversations.items.list(conv.id, order="asc", limit=100)]
    await client.conversations.items.delete(ids[2], conversation_id=conv.id)
    full = await tree(raw, conv.id, limit=1000)
    assert len(full["data"]) == 17 and full["has_more"] is False  # 10 nodes + 7 re-hung copies
    key = [(r["id"], r["parent_id"]) for r in full["data"]]
    for limit in (1, 2, 3, 5, 7):
        rows = await _page_all(raw, conv.id, limit, most=len(key) + 1)
        assert [(r["id"], r["parent_id"]) for r in rows] == key, limit
    # the cursor a page returns resumes right after that page's last row, copies or not
    page = await tree(raw, conv.id, limit=5)
    rest = await tree(raw, conv.id, limit=1000, after=page["last_id"])
    assert [(r["id"], r["parent_id"]) for r in page["data"] + rest["data"]] == key
    # an item id still works as `after` (resuming after its newest copy), an unknown cursor is a 404
    rest = await tree(raw, conv.id, limit=1000, after=ids[9])
    assert rest["data"] == []
    r = await raw.get(f"/v1/conversations/{conv.id}/tree", params={"after": "0" * 32})
    assert r.status_code == 404


async def test_n_alternatives_one_upstream_call(client, raw, mock):
    conv = await client.conversations.create(items=[msg("pick a colour")])
    r = await client.responses.create(model="m", conversation=conv.id, input="go", extra_body={"n": 3})
    assert len(mock.requests) == 1 and mock.requests[0]["n"] == 3
    alts = [r, *[openai.types.responses.Response.model_validate(a) for a in r.model_extra["alternatives"]]]
    assert len({a.id for a in alts}) == 3
    assert [a.output_text for a in alts] == [
        "[2 messages] Echo: go", "[2 messages] Alternative 1: go", "[2 messages] Alternative 2: go"]
    # siblings under one shared copy of the input
    t = await tree(raw, conv.id)
    inputs = [n for n in t["data"] if n["role"] == "user" and n["response_id"] is not None]
    assert len(inputs) == 1
    outs = [n for n in t["data"] if n["role"] == "assistant"]
    assert {n["parent_id"] for n in outs} == {inputs[0]["id"]} and len(outs) == 3
    assert t["head"] == r.output[-1].id  # alternative 0 moves the head
    # each alternative is a full, retrievable, chainable response
    for a in alts:
        got = await client.responses.retrieve(a.id)
        assert got.output_text == a.output_text
        nxt = await client.responses.create(model="m", previous_response_id=a.id, input="more")
        assert mock.requests[-1]["messages"][-2]["content"] == a.output_text
        assert nxt.output_text == "[4 messages] Echo: more"
        items = [x async for x in client.responses.input_items.list(a.id)]
        assert [x.id for x in items] == [inputs[0]["id"]]
    # pick alternative 2 as the conversation's answer
    await raw.post(f"/v1/conversations/{conv.id}/head", json={"item_id": alts[2].output[-1].id})
    assert (await texts(client, conv.id))[-1] == alts[2].output_text


async def test_n_without_upstream_support_calls_n_times(db_url, mock):
    async with serving(Settings(database_url=db_url, upstream_base_url=mock.url, upstream_supports_n=False)) \
            as (_, client, _):
        r = await client.responses.create(model="m", input="hi", extra_body={"n": 3})
    assert len(mock.requests) == 3 and all("n" not in q for q in mock.requests)
    assert len({r.id, *[a["id"] for a in r.model_extra["alternatives"]]}) == 3


async def test_n_streaming_layout(client, raw, mock):
    stream = await client.responses.create(model="m", input="stream two", stream=True, extra_body={"n": 2})
    events = [e async for e in stream]
    seqs = [e.sequence_number for e in events]
    assert seqs == list(range(len(events)))
    by_alt: dict[str, list] = {}
    for e in events:
        by_alt.setdefault(e.model_extra["response_id"], []).append(e)
    assert len(by_alt) == 2
    finals = {}
    for rid, evs in by_alt.items():
        kinds = [e.type for e in evs]
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        assert evs[0].response.id == rid
        text = "".join(e.delta for e in evs if e.type == "response.output_text.delta")
        finals[rid] = evs[-1].response
        assert finals[rid].output_text == text
        assert {e.model_extra["alternative"] for e in evs} in ({0}, {1})
    assert len(mock.requests) == 1 and mock.requests[0]["n"] == 2 and mock.requests[0]["stream"] is True
    for rid, final in finals.items():
        assert (await client.responses.retrieve(rid)).output_text == final.output_text


async def test_delete_item_leaves_forks_alone(client, raw, mock):
    conv = await client.conversations.create(items=[msg("1"), msg("2"), msg("3"), msg("4")])
    ids = [it.id async for it in client.conversations.items.list(conv.id, order="asc")]
    f = await fork(raw, conv.id)
    other = await fork(raw, conv.id, item_id=ids[2])
    after = await client.conversations.items.delete(ids[1], conversation_id=conv.id)
    assert after.id == conv.id
    # the source lost item 2, kept the others with their ids
    assert [it.id async for it in client.conversations.items.list(conv.id, order="asc")] == [ids[0], *ids[2:]]
    assert after.model_extra["head"] == ids[3]
    # the forks did not change
    assert [it.id async for it in client.conversations.items.list(f["id"], order="asc")] == ids
    assert [it.id async for it in client.conversations.items.list(other["id"], order="asc")] == ids[:3]
    # the source's next response sees 3 + 1 messages
    await client.responses.create(model="m", conversation=conv.id, input="5")
    assert [m["content"] for m in mock.requests[-1]["messages"]] == ["1", "3", "4", "5"]
    # deleting the head moves the head up
    last = await client.conversations.items.delete(ids[3], conversation_id=f["id"])
    assert last.model_extra["head"] == ids[2]
    with pytest.raises(openai.NotFoundError):
        await client.conversations.items.retrieve(ids[3], conversation_id=f["id"])
    # still in the other conversations
    assert (await client.conversations.items.retrieve(ids[3], conversation_id=conv.id)).id == ids[3]



async def test_tree_include_item_and_node(client, raw):
    """`include=item` adds each row's item as stored (what `/items` gives for it); `include=node`
    adds the node ids that tell apart the copies of one item id, and the head's node."""
    conv = await client.conversations.create(items=[msg(str(i)) for i in range(4)])
    r = await client.responses.create(model="m", conversation=conv.id, input="go", extra_body={"n": 2})
    path = [it.model_dump(exclude_none=True) async for it in client.conversations.items.list(conv.id, order="asc")]
    plain = await tree(raw, conv.id)
    full = await tree(raw, conv.id, include=["item", "node"])
    assert [{k: v for k, v in row.items() if k not in ("item", "node", "parent_node")} for row in full["data"]] \
        == plain["data"]
    by_id = {row["id"]: row for row in full["data"]}
    for it in path:  # every item of the path, as /items shows it
        assert {k: v for k, v in by_id[it["id"]]["item"].items() if v is not None} == it
    alt = r.model_extra["alternatives"][0]["output"][0]
    assert by_id[alt["id"]]["item"]["content"][0]["text"] == "[5 messages] Alternative 1: go"
    # nodes: unique, parents point at nodes of the tree, the head's node ends the head's path
    nodes = {row["node"]: row for row in full["data"]}
    assert len(nodes) == len(full["data"])
    for row in full["data"]:
        parent = nodes.get(row["parent_node"])
        assert (parent["id"] if parent else None) == row["parent_id"]
    assert nodes[full["head_node"]]["id"] == full["head"] == r.output[-1].id
    assert full["first_id"] == full["data"][0]["node"] and full["last_id"] == full["data"][-1]["node"]
    # either one alone, in one parameter or several, `include[]` too
    only_node = await tree(raw, conv.id, include="node")
    assert "item" not in only_node["data"][0] and "node" in only_node["data"][0] and "head_node" in only_node
    only_item = await tree(raw, conv.id, **{"include[]": "item"})
    assert "item" in only_item["data"][0] and "node" not in only_item["data"][0] and "head_node" not in only_item
    assert (await tree(raw, conv.id, include="item,node"))["data"] == full["data"]
    # a page of them resumes like any page
    page = await tree(raw, conv.id, include="item", limit=2)
    rest = await tree(raw, conv.id, include="item", after=page["last_id"], limit=1000)
    assert page["data"] + rest["data"] == only_item["data"]
    r = await raw.get(f"/v1/conversations/{conv.id}/tree", params={"include": "content"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "include"


async def test_tree_nodes_tell_copies_apart(client, raw):
    """After a delete the tree holds an item id twice; `parent_node` still names one parent."""
    conv = await client.conversations.create(items=[msg(str(i)) for i in range(5)])
    ids = [it.id async for it in client.conversations.items.list(conv.id, order="asc")]
    await client.conversations.items.delete(ids[1], conversation_id=conv.id)
    full = await tree(raw, conv.id, include=["node", "item"])
    assert len(full["data"]) == 8  # 5 nodes + 3 re-hung copies
    nodes = {row["node"]: row for row in full["data"]}
    path, n = [], nodes[full["head_node"]]
    while n is not None:
        path.append(n["item"]["content"][0]["text"])
        n = nodes.get(n["parent_node"])
    assert path[::-1] == ["0", "2", "3", "4"]
