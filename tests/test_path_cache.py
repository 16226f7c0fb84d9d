"""The history cache (`store.history_cache`): bounded, and never the cause of a wrong history, even
when another process (here: a second app on the same database, without the cache) moves heads,
adds items and deletes items on the path. SQLite and PostgreSQL."""

from __future__ import annotations

import httpx2
import openai

from branchwise.app import create_app
from branchwise.settings import Settings
from branchwise.store.history_cache import ENTRY_OVERHEAD, PathCache, extend


def test_cache_is_bounded_by_bytes_least_recently_used_first():
    entry = 100 + ENTRY_OVERHEAD  # what one 100-byte history counts for
    c = PathCache(8 * entry)  # entries of up to `entry` bytes
    for k in "abcdefgh":
        c.put(k, k.encode() * 100)
    assert c.size_bytes == 8 * entry and len(c) == 8
    assert c.get("a") == b"a" * 100  # a is now the most recently used
    c.put("i", b"i" * 100)  # one entry over: the least recently used (b) goes
    assert c.get("b") is None and c.get("a") is not None and c.get("i") is not None
    assert c.size_bytes == 8 * entry and len(c) == 8
    c.put("a", b"w" * 10)  # replacing an entry counts its new size only
    assert c.size_bytes == 8 * entry - 90
    c.put("huge", b"h" * entry)  # over max_bytes / 8 with its overhead: not kept, nothing pushed out
    assert c.get("huge") is None and len(c) == 8


def test_extend_joins_like_the_path_query():
    assert extend(b"", [b'{"a":1}', None, b'{"b":2}']) == b'{"a":1},{"b":2}'
    assert extend(b'{"h":0}', [None]) == b'{"h":0}'
    assert extend(b'{"h":0}', [b'{"a":1}']) == b'{"h":0},{"a":1}'


def _texts(messages: list[dict]) -> list[str]:
    out = []
    for m in messages:
        c = m["content"]
        out.append(c if isinstance(c, str) else "".join(p.get("text", "") for p in c))
    return out


async def _path_texts(client: openai.AsyncOpenAI, conv_id: str) -> list[str]:
    return [it.content[0].text async for it in client.conversations.items.list(conv_id, order="asc", limit=100)]


async def test_cached_histories_match_the_tree_while_another_process_changes_it(db_url, mock):
    cached = create_app(Settings(database_url=db_url, upstream_base_url=mock.url))
    plain = create_app(Settings(database_url=db_url, upstream_base_url=mock.url, path_cache_mb=0))
    async with cached.router.lifespan_context(cached), plain.router.lifespan_context(plain):
        assert cached.state.store.caches_histories and not plain.state.store.caches_histories
        ha = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=cached), base_url="http://test")
        hb = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=plain), base_url="http://test")
        async with ha, hb, openai.AsyncOpenAI(api_key="k", base_url="http://test/v1", http_client=ha,
                                             max_retries=0) as a, \
                openai.AsyncOpenAI(api_key="k", base_url="http://test/v1", http_client=hb, max_retries=0) as b:

            async def turn(text: str) -> openai.types.responses.Response:
                """A response through the cached app; what it sent upstream must be the path
                as the uncached app lists it, plus the new input."""
                expected = await _path_texts(b, conv.id)
                r = await a.responses.create(model="m", conversation=conv.id, input=text)
                assert r.status == "completed"
                assert _texts(mock.requests[-1]["messages"]) == [*expected, text]
                return r

            conv = await a.conversations.create(items=[{"type": "message", "role": "user", "content": "seed"}])
            r1 = await turn("a1")
            await turn("a2")  # its history came from the cache (r1's commit put it there)
            # the other process answers on the same conversation: the head moves to a node the
            # cached app has never seen
            await b.responses.create(model="m", conversation=conv.id, input="b1")
            await turn("a3")
            # the other process appends items and deletes one on the path (the nodes below it
            # are re-hung as copies)
            await b.conversations.items.create(conv.id, items=[{"type": "message", "role": "user", "content": "b2"}])
            await b.conversations.items.delete(r1.output[0].id, conversation_id=conv.id)
            await turn("a4")
            assert "a1" in _texts(mock.requests[-1]["messages"]) and r1.output[0].content[0].text not in \
                _texts(mock.requests[-1]["messages"])
            # this process still knows the head, but its history has left the cache
            await turn("a4b")
            cached.state.store.forget_histories()
            await turn("a4c")
            await turn("a4d")  # and from the cache again
            # back to the seed, through the other process, then on from there
            seed = [it.id async for it in b.conversations.items.list(conv.id, order="asc")][0]
            r = await hb.post(f"/v1/conversations/{conv.id}/head", json={"item_id": seed})
            assert r.status_code == 200 and r.json()["head"] == seed
            await turn("a5")
            assert _texts(mock.requests[-1]["messages"]) == ["seed", "a5"]
            # previous_response_id from a response the other process stored
            rb = await b.responses.create(model="m", input="c1", previous_response_id=r1.id)
            ra = await a.responses.create(model="m", input="c2", previous_response_id=rb.id)
            assert ra.status == "completed"
            assert _texts(mock.requests[-1]["messages"]) == [
                "seed", "a1", r1.output_text, "c1", rb.output_text, "c2"]
            # the cached app's head moves answer with the conversation as it now is
            r = await ha.post(f"/v1/conversations/{conv.id}/head", json={"item_id": seed})
            assert r.status_code == 200 and r.json()["head"] == seed and r.json()["id"] == conv.id
            assert (await b.conversations.retrieve(conv.id)).model_extra["head"] == seed
