"""Discovery: GET /v1/conversations (a branchwise extension: the SDK has no `conversations.list`,
so raw HTTP), on SQLite and PostgreSQL; GET /v1/models through the SDK, with pattern routes
asking the mock upstream's own /v1/models."""

from __future__ import annotations

import openai
import pytest

from branchwise.settings import Settings, UpstreamConfig

from .conftest import free_port
from .helpers import check_error, serving
from .test_bad_input import Untouched

# ---------------------------------------------------------------- GET /v1/conversations


async def listed(raw, **params) -> dict:
    r = await raw.get("/v1/conversations", params=params)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"object", "data", "first_id", "last_id", "has_more"} and body["object"] == "list"
    return body


def ids(body: dict) -> list[str]:
    return [c["id"] for c in body["data"]]


async def test_list_newest_first_and_page(client, raw):
    assert await listed(raw) == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
    made = [(await client.conversations.create(metadata={"n": str(i)})).id for i in range(5)]
    fork = (await raw.post(f"/v1/conversations/{made[0]}/fork", json={})).json()["id"]
    newest_first = [fork, *reversed(made)]
    everything = await listed(raw)
    assert ids(everything) == newest_first and everything["has_more"] is False
    assert (everything["first_id"], everything["last_id"]) == (fork, made[0])
    # each entry is the conversation object, extensions included
    assert everything["data"][0] == (await raw.get(f"/v1/conversations/{fork}")).json()
    assert everything["data"][0]["forked_from"] == {"conversation_id": made[0], "item_id": None}

    # pages of two, following `after` (the last id of a page)
    pages, after = [], None
    while True:
        page = await listed(raw, limit=2, **({"after": after} if after else {}))
        pages.append(ids(page))
        after = page["last_id"]
        if not page["has_more"]:
            break
    assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:6]]
    assert ids(await listed(raw, order="asc")) == list(reversed(newest_first))
    assert ids(await listed(raw, order="asc", after=made[2], limit=2)) == [made[3], made[4]]

    # the cursor is a position, not a lookup: a page goes on after its last conversation is deleted
    await client.conversations.delete(made[3])
    assert ids(await listed(raw, after=made[3])) == [made[2], made[1], made[0]]
    assert ids(await listed(raw, after="conv_" + "f" * 48, limit=1)) == [fork]


async def test_list_by_metadata(client, raw):
    a = await client.conversations.create(metadata={"user": "alice", "topic": "trips"})
    b = await client.conversations.create(metadata={"user": "bob", "topic": "trips"})
    c = await client.conversations.create(metadata={"user": "alice", "topic": "food & \"wine\" é"})
    await client.conversations.create()
    assert ids(await listed(raw, **{"metadata[user]": "alice"})) == [c.id, a.id]
    assert ids(await listed(raw, **{"metadata[topic]": "trips"})) == [b.id, a.id]
    assert ids(await listed(raw, **{"metadata[user]": "alice", "metadata[topic]": "trips"})) == [a.id]
    assert ids(await listed(raw, **{"metadata[topic]": "food & \"wine\" é"})) == [c.id]
    assert ids(await listed(raw, **{"metadata[user]": "carol"})) == []
    assert ids(await listed(raw, **{"metadata[nobody]": ""})) == []
    # filtered pages
    first = await listed(raw, limit=1, **{"metadata[user]": "alice"})
    assert ids(first) == [c.id] and first["has_more"] is True
    assert ids(await listed(raw, limit=1, after=c.id, **{"metadata[user]": "alice"})) == [a.id]
    # metadata changed later is what counts
    await client.conversations.update(b.id, metadata={"user": "alice"})
    assert ids(await listed(raw, **{"metadata[user]": "alice"})) == [c.id, b.id, a.id]


@pytest.mark.parametrize(("params", "param"), [
    ({"limit": "0"}, "limit"), ({"limit": "101"}, "limit"), ({"limit": "x"}, "limit"), ({"limit": "1.5"}, "limit"),
    ({"limit": "+5"}, "limit"), ({"limit": " 5"}, "limit"), ({"limit": "٥"}, "limit"), ({"limit": "9" * 5000}, "limit"),
    ({"order": "newest"}, "order"), ({"after": "msg_" + "0" * 48}, "after"), ({"after": "conv_\x00"}, "after"),
    ({"after": "abc"}, "after"), ({"metadata": "x"}, "metadata"), ({"metadata[]": "x"}, "metadata"),
    ({"metadata[k": "x"}, "metadata"), ({"metadata[" + "k" * 65 + "]": "x"}, "metadata[" + "k" * 64 + "]"),
    ({"metadata[k]": "v" * 513}, "metadata[k]"), ({"metadata[k]": "a\x00b"}, "metadata[k]"),
    ({"metadata[k\x00]": "v"}, "metadata[k\x00]"),
    ({f"metadata[k{i}]": "v" for i in range(17)}, "metadata"),
])
async def test_list_refuses_bad_parameters(raw, params, param):
    r = await raw.get("/v1/conversations", params=params)
    check_error(r, 400, param, "invalid_value")


# ---------------------------------------------------------------- GET /v1/models


def routes(mock, *extra: UpstreamConfig) -> list[UpstreamConfig]:
    return [UpstreamConfig(name="vllm", base_url=mock.url, models=["mock*", "served-too"]), *extra]


async def models(client: openai.AsyncOpenAI) -> list[tuple[str, str]]:
    return [(m.id, m.owned_by) async for m in client.models.list()]


async def test_models_lists_what_pattern_upstreams_report(tmp_path, mock):
    mock.app.model_ids = ("mock", "mock-tools", "other-model", "llama-3")
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'b.db'}", upstreams=routes(
        mock, UpstreamConfig(name="ollama", base_url=mock.url, models=["llama-*", "gemma"]),
        UpstreamConfig(name="again", base_url=mock.url, models=["mock-tools", "*"])), models_list_ttl=3600)
    async with serving(settings) as (_, client, raw):
        # literal names always; for patterns, the upstream's names that match them; each name
        # owned by the route that serves it (the first that matches)
        assert await models(client) == [
            ("served-too", "vllm"), ("mock", "vllm"), ("mock-tools", "vllm"), ("gemma", "ollama"),
            ("llama-3", "ollama"), ("other-model", "again")]
        assert mock.app.models_asked == 3  # once per route with patterns
        body = (await raw.get("/v1/models")).json()
        assert body["data"][0] == {"id": "served-too", "object": "model", "created": 0, "owned_by": "vllm"}
        assert mock.app.models_asked == 3  # from the cache
        # every name listed is one the server routes
        r = await client.responses.create(model="other-model", input="hi")
        assert r.status == "completed"


async def test_models_tolerates_a_failing_upstream(tmp_path, mock):
    down = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'b.db'}", models_list_ttl=3600, upstreams=routes(
        mock, UpstreamConfig(name="down", base_url=down, models=["gone-*", "kept"])))
    mock.app.models_status = 503
    async with serving(settings) as (_, client, _):
        # neither upstream lists anything: the literal names are still there
        assert await models(client) == [("served-too", "vllm"), ("kept", "down")]
        asked = mock.app.models_asked
        assert await models(client) == [("served-too", "vllm"), ("kept", "down")]
        assert mock.app.models_asked == asked  # a failure is remembered for a while, not retried per call
    mock.app.models_status = 200
    quick = settings.model_copy(update={"models_list_ttl": 0})
    async with serving(quick) as (_, client, _):  # (no cache: asked on every listing)
        assert await models(client) == [("served-too", "vllm"), ("mock", "vllm"), ("mock-reasoning", "vllm"),
                                         ("mock-tools", "vllm"), ("kept", "down")]
        mock.app.model_ids = ("mock-new",)
        assert await models(client) == [("served-too", "vllm"), ("mock-new", "vllm"), ("kept", "down")]
        mock.app.models_status = 500
        assert await models(client) == [("served-too", "vllm"), ("kept", "down")]
        mock.app.models_status = 200
        mock.app.model_ids = ("mock", {"id": 5}, "x" * 3)  # (the mock sends what it is given)
        assert ("mock", "vllm") in await models(client)


async def test_models_of_the_single_upstream_shortcut(db_url, mock, db_engine):
    """(also: listing models stores nothing)"""
    settings = Settings(database_url=db_url, upstream_base_url=mock.url, models_list_ttl=3600)
    async with serving(settings) as (_, client, _):
        async with Untouched(db_engine, mock, "GET /v1/models"):
            # the single-upstream shortcut serves every name ("*"): the upstream's own list
            assert await models(client) == [("mock", "upstream"), ("mock-reasoning", "upstream"),
                                            ("mock-tools", "upstream")]


async def test_the_migration_indexes_metadata_stored_before_it(db_url):
    """Revision 0006 fills `conversation_metadata` from the conversations already stored, so a
    server upgraded in place lists them by metadata too; and it downgrades."""
    from alembic import command

    from branchwise.store.connect import _alembic_config, create_engine, migrate, writer

    engine = create_engine(db_url)
    cfg = _alembic_config()

    def to(revision: str):
        def run(sync_conn) -> None:
            cfg.attributes["connection"] = sync_conn
            (command.upgrade if revision == "head" else command.downgrade)(cfg, revision)
        return run

    try:
        await migrate(engine)
        async with writer(engine).begin() as conn:
            await conn.run_sync(to("0005"))
            for n, meta in enumerate(['{"user": "alice", "k": "v"}', '{}', '{"user": "bob"}']):
                await conn.exec_driver_sql(
                    "INSERT INTO conversations (id, tree, head, created_at, metadata) VALUES "
                    f"('conv_{n:048x}', 't', NULL, 1, '{meta}')")
        async with writer(engine).begin() as conn:
            await conn.run_sync(to("head"))
        settings = Settings(database_url=db_url, upstreams=[UpstreamConfig(name="x", base_url="http://127.0.0.1:9/v1")])
        async with serving(settings) as (_, _, raw):
            assert ids(await listed(raw, **{"metadata[user]": "alice"})) == [f"conv_{0:048x}"]
            assert ids(await listed(raw, **{"metadata[user]": "bob"})) == [f"conv_{2:048x}"]
            assert len(ids(await listed(raw))) == 3
    finally:
        await engine.dispose()
