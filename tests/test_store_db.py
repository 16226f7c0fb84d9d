"""The repository on the raw drivers (`store.statements`, `store.sqlite_writer`,
`store.postgres`, `store.group_commit`): statements written once for both drivers, and writes
from several processes on one database. Each "process" here is a Repository on
an engine of its own: on SQLite it has its own connections, write lock and flock descriptor,
which is what another process would have."""

from __future__ import annotations

import asyncio
import fcntl
import os
import random
import sqlite3

import orjson
import pytest
from sqlalchemy import text

from branchwise.core.ids import new_id
from branchwise.core.tree import place
from branchwise.store import connect, statements
from branchwise.store.connect import create_engine, migrate, writer
from branchwise.store.group_commit import OneInFlight
from branchwise.store.pg_groups import PgGroups
from branchwise.store.repository import Repository
from branchwise.store.sqlite_writer import SqliteWriter
from branchwise.store.statements import SQL
from branchwise.wire import items as witems
from branchwise.wire import models as m

from .helpers import until


def test_sql_numbers_parameters_for_asyncpg_and_leaves_casts_alone():
    q = SQL("SELECT :a, x::text, :b, string_agg(c, '\\x2c'::bytea), :a WHERE y = :b_2")
    assert q.text.startswith("SELECT :a, x::text, :b")
    assert q.pg == "SELECT $1, x::text, $2, string_agg(c, '\\x2c'::bytea), $1 WHERE y = $3"
    assert q.names == ("a", "b", "b_2")
    assert q.args({"b_2": 3, "a": 1, "b": 2, "unused": 9}) == (1, 2, 3)


def _message(role: str, text_: str) -> witems.NewItem:
    return witems.from_input(m.Message(role=role, content=text_))


async def _stores(url: str, n: int) -> list[Repository]:
    engines = [create_engine(url) for _ in range(n)]
    await migrate(engines[0])
    return [Repository(e) for e in engines]


async def _close(stores: list[Repository]) -> None:
    for s in stores:
        await s.close()
        await s.engine.dispose()


async def _commit(store: Repository, conv_id: str, tree: str, base: str, base_depth: int, k: int) -> tuple[str, bool]:
    rid = new_id("resp")
    placed = place([_message("user", f"q{k}"), _message("assistant", f"a{k}")], base, base_depth, rid)
    row = {"id": rid, "status": "completed", "created_at": 1, "conversation_id": conv_id,
           "previous_response_id": None, "tree": tree, "base_node": base, "input_node": placed[0].node,
           "input_count": 1, "last_node": placed[-1].node, "body": b"{}"}
    moved = await store.commit_response(tree=tree, placed=placed, response_rows=[row], conversation_id=conv_id,
                                        base=base, new_head=placed[-1].node)
    return rid, moved


async def test_writers_in_two_processes_all_land_and_one_head_moves(db_url):
    """60 responses from two processes, all branching from the same head at once: every one is
    stored with its items, and the compare-and-swap lets exactly one of them move the head.
    (On SQLite the writes interleave on this one loop, each synchronous; separate server
    processes writing at the same time are test_e2e's `--workers 2` tests.)"""
    a, b = stores = await _stores(db_url, 2)
    try:
        conv_id = new_id("conv")
        await a.create_conversation(conv_id, conv_id, {}, [_message("user", "seed")])
        conv = await a.conversation(conv_id)
        results = await asyncio.gather(*(
            _commit(s, conv_id, conv.tree, conv.head, conv.head_depth, k)
            for k in range(30) for s in (a, b)
        ))
        assert sum(moved for _, moved in results) == 1
        winner = next(rid for rid, moved in results if moved)
        for s in stores:  # both processes see the same tree
            after = await s.conversation(conv_id)
            assert after.head_depth == conv.head_depth + 2
            row = await s.response(winner)
            assert after.head == row.last_node
            for rid, _ in results:
                assert (await s.response(rid)).status == "completed"
        async with a.engine.connect() as c:
            n_items = (await c.execute(text("SELECT count(*) FROM items WHERE tree = :t"), {"t": conv.tree})).scalar()
        assert n_items == 1 + 2 * 60
    finally:
        await _close(stores)


async def test_hot_write_polls_while_another_process_holds_the_flock(tmp_path, monkeypatch):
    """Another process in a hot-path write holds the flock: this one retries from the loop
    (no thread) and lands once the flock is free."""
    tries = 0
    # private: the number of inline tries is the property, and nothing public counts them
    real = SqliteWriter._write_inline

    def counting(self, writes):
        nonlocal tries
        tries += 1
        return real(self, writes)

    monkeypatch.setattr(SqliteWriter, "_write_inline", counting)
    url = f"sqlite:///{tmp_path / 'f.db'}"
    (a,) = stores = await _stores(url, 1)
    other = os.open(str(tmp_path / "f.db") + ".branchwise-lock", os.O_RDWR)  # another process's descriptor
    try:
        conv_id = new_id("conv")
        await a.create_conversation(conv_id, conv_id, {}, [_message("user", "seed")])
        conv = await a.conversation(conv_id)
        fcntl.flock(other, fcntl.LOCK_EX)
        task = asyncio.ensure_future(_commit(a, conv_id, conv.tree, conv.head, conv.head_depth, 0))
        await asyncio.sleep(0.03)
        assert not task.done() and tries >= 3  # 0.5 + 1 + 2 + 4 ... ms apart
        fcntl.flock(other, fcntl.LOCK_UN)
        rid, moved = await asyncio.wait_for(task, 5)
        assert moved and (await a.response(rid)).status == "completed"
        # private: no interface shows which connection served a write
        assert a.db._thread_conn is None  # it never needed the writer thread
    finally:
        os.close(other)
        await _close(stores)


async def test_hot_write_waits_for_a_writer_outside_the_flock(tmp_path):
    """A transaction that does not queue on the flock (a SQLAlchemy `Writer` one, as leases,
    runs and migrations use) holds SQLite's write lock: a hot-path write from another process waits for it to end,
    then lands, and the open transaction's own write is not lost."""
    url = f"sqlite:///{tmp_path / 'w.db'}"
    a, b = stores = await _stores(url, 2)
    try:
        conv_id = new_id("conv")
        await a.create_conversation(conv_id, conv_id, {}, [_message("user", "seed")])
        conv = await a.conversation(conv_id)
        order: list[str] = []
        started = asyncio.Event()

        async def outside() -> None:
            async with writer(b.engine).begin() as conn:
                await conn.execute(text("UPDATE conversations SET metadata = '{\"k\": 1}' WHERE id = :id"),
                                   {"id": conv_id})
                started.set()
                await asyncio.sleep(0.3)
                order.append("outside")

        async def hot() -> None:
            await started.wait()
            await _commit(a, conv_id, conv.tree, conv.head, conv.head_depth, 0)
            order.append("hot")

        await asyncio.gather(outside(), hot())
        assert order == ["outside", "hot"]
        after = await a.conversation(conv_id)
        assert after.metadata == '{"k": 1}' and after.head_depth == conv.head_depth + 2
    finally:
        await _close(stores)


@pytest.mark.parametrize("disk", ["fast", "slow"])
async def test_sqlite_wal_starts_over_under_steady_writes(tmp_path, monkeypatch, disk):
    """The periodic checkpoint must let the WAL start over, or the file grows by every page of
    every write (it did: 500 MB in 8 s). On a slow disk (every first pass too slow) the short
    pass that lets it start over is put off, but only five times in a row."""
    # "fast": no pass ever counts as slow, whatever else the machine is doing meanwhile
    monkeypatch.setattr(SqliteWriter, "SLOW_CHECKPOINT_S", -1.0 if disk == "slow" else 3600.0)
    # (rows written: each write below stores two items and a response row; all but the first
    # find the head moved)
    monkeypatch.setattr(SqliteWriter, "CHECKPOINT_EVERY", 30)
    monkeypatch.setattr(SqliteWriter, "RESTART_EVERY", 90)
    url = f"sqlite:///{tmp_path / 'wal.db'}"
    wal = tmp_path / "wal.db-wal"
    (a,) = stores = await _stores(url, 1)
    try:
        conv_id = new_id("conv")
        await a.create_conversation(conv_id, conv_id, {}, [_message("user", "seed")])
        conv = await a.conversation(conv_id)
        # private: the checkpoint schedule is internal; nothing public runs or reports it
        a.db._next_checkpoint = a.db._rows + 30
        a.db._next_restart = a.db._rows + 90
        size_before = wal.stat().st_size
        for k in range(10):
            await _commit(a, conv_id, conv.tree, conv.head, conv.head_depth, k)
        ten = wal.stat().st_size - size_before  # what ten writes add to a WAL that does not restart
        assert ten > 0
        for k in range(10, 300):
            await _commit(a, conv_id, conv.tree, conv.head, conv.head_depth, k)
            if k % 10 == 0 and a.db._checkpoint_task is not None:
                # a server yields all the time and the checkpoint runs beside the writes; here the
                # writes come back to back, so wait for it (a loaded machine may not run its
                # thread within a few milliseconds)
                await asyncio.wait_for(asyncio.shield(a.db._checkpoint_task), 10)
        # 300 writes would need 30x; put off five times, the WAL starts over after 150 at most
        assert wal.stat().st_size < size_before + (8 if disk == "fast" else 20) * ten
        assert a.db._restarted > 0
        assert len(await a.candidates(conv.tree, (await a.conversation(conv_id)).head_item)) == 1
    finally:
        await _close(stores)


async def test_sqlite_wal_file_shrinks_back_after_a_burst(tmp_path, monkeypatch):
    """A burst of writes grows the WAL file far past its limit; SQLite reuses the file from its
    start once it is checkpointed, but never gives the space back unless told to
    (journal_size_limit). The next checkpoint sees the WAL too big and lets it start over (no
    scheduled restart is due), and the next write cuts the file back to the limit."""
    limit = 64 << 10
    monkeypatch.setattr(connect, "SQLITE_WAL_LIMIT", limit)
    monkeypatch.setattr(SqliteWriter, "SLOW_CHECKPOINT_S", 3600.0)
    monkeypatch.setattr(SqliteWriter, "CHECKPOINT_EVERY", 40)
    monkeypatch.setattr(SqliteWriter, "RESTART_EVERY", 10**9)  # only the WAL's size can start it over
    url = f"sqlite:///{tmp_path / 'burst.db'}"
    wal = tmp_path / "burst.db-wal"
    (a,) = stores = await _stores(url, 1)
    try:
        conv_id = new_id("conv")
        await a.create_conversation(conv_id, conv_id, {}, [_message("user", "seed")])
        for k in range(5):  # the burst: 5 x 200 items of 2 kB, one transaction each
            await a.append_items(conv_id, [_message("user", f"{k}.{j} " + "x" * 2000) for j in range(200)])
        burst = wal.stat().st_size
        assert burst > 16 * limit
        conv = await a.conversation(conv_id)
        sizes = []
        for k in range(200):  # then ordinary writes
            await _commit(a, conv_id, conv.tree, conv.head, conv.head_depth, k)
            if a.db._checkpoint_task is not None:  # (private: see the test above)
                await asyncio.wait_for(asyncio.shield(a.db._checkpoint_task), 10)
            sizes.append(wal.stat().st_size)
        assert min(sizes) <= limit, (burst, sizes[::20])
        assert a.db._restarted > 0
        assert (await a.conversation(conv_id)).head_depth == conv.head_depth + 2
    finally:
        await _close(stores)


async def test_sqlite_wal_file_is_emptied_once_the_writes_stop(tmp_path, monkeypatch):
    """Whatever size the writes left the WAL file at, a short while after they stop it is
    checkpointed whole and truncated: an idle server keeps no WAL."""
    monkeypatch.setattr(SqliteWriter, "IDLE_S", 0.05)
    url = f"sqlite:///{tmp_path / 'idle.db'}"
    wal = tmp_path / "idle.db-wal"
    (a,) = stores = await _stores(url, 1)
    try:
        conv_id = new_id("conv")
        await a.create_conversation(conv_id, conv_id, {}, [_message("user", "seed")])
        for k in range(3):
            await a.append_items(conv_id, [_message("user", f"{k}.{j} " + "x" * 2000) for j in range(200)])
            await asyncio.sleep(0)  # (writes back to back: not idle)
        assert wal.stat().st_size > 1 << 20
        await until(lambda: wal.stat().st_size == 0, "the WAL file to be emptied", timeout=10)
        assert (await a.conversation(conv_id)).head_depth == 600  # (all of it in the database file)
        await a.append_items(conv_id, [_message("user", "after")])  # and writes go on
        assert (await a.conversation(conv_id)).head_depth == 601
    finally:
        await _close(stores)


async def test_sqlite_read_refused_on_the_loop_retries_then_uses_the_writer_thread(tmp_path):
    """The loop's connection never waits for a lock; a read it is refused (a rare WAL-index
    moment) is tried again, then served by the writer thread's connection."""
    url = f"sqlite:///{tmp_path / 'r.db'}"
    (a,) = stores = await _stores(url, 1)
    try:
        conv_id = new_id("conv")
        await a.create_conversation(conv_id, conv_id, {}, [_message("user", "seed")])
        # private: a refused read on the loop's connection cannot be caused from outside
        real = a.db._loop_conn
        refused = 0

        class Refusing:
            def execute(self, *args):
                nonlocal refused
                refused += 1
                raise sqlite3.OperationalError("database is locked")

        a.db._loop_conn = Refusing()
        try:
            conv = await a.conversation(conv_id)
        finally:
            a.db._loop_conn = real
        assert conv is not None and conv.id == conv_id and conv.head_depth == 0
        assert refused == 3 and a.db._thread_conn is not None
    finally:
        await _close(stores)


async def test_finding_an_item_in_a_tree_is_an_index_search_not_a_tree_scan(tmp_path):
    """Head moves and forks at an item look the item up in its tree. SQLite once answered that
    from the (tree, seq) index, reading the whole tree, so they slowed as a conversation grew."""
    # private: the statements' plans are the property; no interface exposes the SQL it runs
    (a,) = stores = await _stores(f"sqlite:///{tmp_path / 'p.db'}", 1)
    try:
        for q in (statements.CANDIDATES, statements.TREE_AFTER):
            plan = " ".join(r[-1] for r in a.db._loop_conn.execute(
                "EXPLAIN QUERY PLAN " + q.text, {"tree": "t", "item_id": "i"}).fetchall())
            assert "ix_items_item_tree_seq (item_id=? AND tree=?)" in plan, plan
    finally:
        await _close(stores)


async def test_commits_of_every_shape_store_everything(db_url):
    """The commit as one statement takes two forms on PostgreSQL: VALUES rows up to 4,000
    parameters (and eight commits), unnest'ed arrays past that (here 400 items). Each shape
    stores every item and row and moves the head by compare-and-swap (SQLite runs the same calls
    through its own path)."""
    engine = create_engine(db_url)
    await migrate(engine)
    store = Repository(engine, 0)  # no history cache: every path below is read from the database
    try:
        conv_id = new_id("conv")
        await store.create_conversation(conv_id, conv_id, {}, [_message("user", "seed")])
        expected = ["seed"]
        for n_items, n_rows in ((2, 1), (1, 0), (9, 1), (3, 9), (8, 8), (0, 2), (400, 1)):
            conv = await store.conversation(conv_id)
            texts = [f"{n_items}x{n_rows}-{k}" for k in range(n_items)]
            ids = [new_id("resp") for _ in range(n_rows)]
            placed = place([_message("user", t) for t in texts], conv.head, conv.head_depth, ids[0] if ids else None)
            last = placed[-1].node if placed else conv.head
            rows = [{"id": rid, "status": "completed", "created_at": 1, "conversation_id": conv_id,
                     "previous_response_id": None, "tree": conv.tree, "base_node": conv.head,
                     "input_node": last, "input_count": n_items, "last_node": last, "body": b"{}"} for rid in ids]
            moved = await store.commit_response(tree=conv.tree, placed=placed, response_rows=rows,
                                                conversation_id=conv_id, base=conv.head, new_head=last)
            assert moved is (last is not None)
            # a second commit from the same base, now stale, stores its items and moves nothing
            stale = place([_message("user", "stale")], conv.head, conv.head_depth, None)
            assert not n_items or await store.commit_response(tree=conv.tree, placed=stale, response_rows=[],
                                               conversation_id=conv_id, base=conv.head,
                                               new_head=stale[-1].node) is False
            expected += texts
            after = await store.conversation(conv_id)
            assert after.head == last and after.head_depth == conv.head_depth + n_items
            history = [msg["content"] for msg in orjson.loads(b"[" + await store.path_chat(after.head) + b"]")]
            assert history == expected
            for rid in ids:
                row = await store.response(rid)
                assert row is not None and row.last_node == last and row.input_count == n_items
    finally:
        await store.close()
        await engine.dispose()


async def test_long_histories_read_through_blocks_are_the_paths(db_url):
    """A history is read 64 items at a time past the second block (`history_blocks`). In a tree
    that branches within and across blocks (a commit on top of a branch, a line appended
    whole, a delete that re-hangs a path as copies), with items a model never sees among them,
    every history read from the database is the path's messages, item by item, in order."""
    engine = create_engine(db_url)
    await migrate(engine)
    store = Repository(engine, 0)  # no history cache: every path below is read from the database
    rng = random.Random(20)
    try:
        conv_id = new_id("conv")
        texts: dict[str, str | None] = {}  # node -> its message's text (None: not a message)
        parent_of: dict[str, str | None] = {}

        def item(k: int) -> witems.NewItem:
            if k % 11 == 5:  # an item with no chat message (never sent to a model)
                it = _message("user", f"hidden {k}")
                it.chat = None
                return it
            return _message("user" if k % 2 else "assistant", f"m{k}")

        def remember(placed) -> None:
            for p in placed:
                texts[p.node] = None if p.item.chat is None else orjson.loads(p.item.data)["content"][0]["text"]
                parent_of[p.node] = p.parent

        def expected(node: str | None) -> list[str]:
            out = []
            while node is not None:
                if texts[node] is not None:
                    out.append(texts[node])
                node = parent_of[node]
            return out[::-1]

        async def read(node: str) -> list[str]:
            return [m["content"] for m in orjson.loads(b"[" + await store.path_chat(node) + b"]")]

        chain = [item(k) for k in range(300)]
        await store.create_conversation(conv_id, conv_id, {}, chain)
        conv = await store.conversation(conv_id)
        # (the chain's nodes, from the tree's rows: create_conversation places them)
        rows = await store.tree_items(conv.tree)
        for node, parent, *_rest, data, chat in rows:
            parent_of[node] = parent
            texts[node] = None if chat is None else orjson.loads(data)["content"][0]["text"]
        nodes = [r[0] for r in rows]
        k = 1000
        for _ in range(12):  # branches from random points, up to 150 items each, as responses
            base = rng.choice(nodes)
            depth = (await store.node_info(base))[0]
            line = [item(k + j) for j in range(rng.randint(1, 150))]
            k += len(line)
            placed = place(line, base, depth, new_id("resp"))
            await store.commit_response(tree=conv.tree, placed=placed, response_rows=[], conversation_id=None,
                                        base=None, new_head=None)
            remember(placed)
            nodes += [p.node for p in placed]
        await store.append_items(conv_id, [item(k + j) for j in range(70)])  # onto the head, in one go
        head = (await store.conversation(conv_id)).head
        for node, parent, *_rest, data, chat in await store.tree_items(conv.tree):
            if node not in texts:
                parent_of[node] = parent
                texts[node] = None if chat is None else orjson.loads(data)["content"][0]["text"]
        victim = (await store.walk(head, 40, 40))[0]  # a delete re-hangs the 330 items below it
        assert await store.delete_from_path(conv_id, victim.item_id) is True
        for node, parent, *_rest, data, chat in await store.tree_items(conv.tree):
            if node not in texts:
                parent_of[node] = parent
                texts[node] = None if chat is None else orjson.loads(data)["content"][0]["text"]
        head = (await store.conversation(conv_id)).head
        deep = [n for n in texts if n != head]
        for node in [head, *rng.sample(deep, 60)]:
            assert await read(node) == expected(node)
        async with engine.connect() as conn:  # (private: that blocks were used at all)
            blocks = (await conn.execute(text("SELECT count(*) FROM history_blocks"))).scalar()
        assert blocks >= 8
    finally:
        await store.close()
        await engine.dispose()


async def test_sqlite_writes_of_one_loop_pass_commit_together_and_fail_alone(tmp_path, monkeypatch):
    """Group commit: the hot-path writes that reach the store in one pass of the event loop share
    one transaction; every one lands, the compare-and-swap of each sees the ones before it (one
    head move out of 20 from the same base), and a write that fails fails alone."""
    groups: list[int] = []
    # private: which writes shared a transaction shows in no result, only in this call
    real = SqliteWriter._write_inline

    def recording(self, writes):
        groups.append(len(writes))
        return real(self, writes)

    monkeypatch.setattr(SqliteWriter, "_write_inline", recording)
    (a,) = stores = await _stores(f"sqlite:///{tmp_path / 'g.db'}", 1)
    try:
        conv_id = new_id("conv")
        await a.create_conversation(conv_id, conv_id, {}, [_message("user", "seed")])
        conv = await a.conversation(conv_id)
        groups.clear()
        results = await asyncio.gather(*(_commit(a, conv_id, conv.tree, conv.head, conv.head_depth, k)
                                         for k in range(20)))
        assert groups == [20]
        assert sum(moved for _, moved in results) == 1
        after = await a.conversation(conv_id)
        winner = next(rid for rid, moved in results if moved)
        assert after.head == (await a.response(winner)).last_node
        for rid, _ in results:
            assert (await a.response(rid)).status == "completed"

        # one write of a group breaks a constraint (a response id stored already): it alone fails
        groups.clear()
        dup = results[0][0]
        good = asyncio.ensure_future(_commit(a, conv_id, conv.tree, after.head, after.head_depth, 100))
        bad = asyncio.ensure_future(a.db.write([(SQL(
            "INSERT INTO responses (id, status, created_at, tree, input_count, body)"
            " VALUES (:id, 'completed', 1, :tree, 0, x'00')"), {"id": dup, "tree": conv.tree})]))
        late = asyncio.ensure_future(_commit(a, conv_id, conv.tree, after.head, after.head_depth, 101))
        with pytest.raises(sqlite3.IntegrityError):
            await bad
        (rid_good, moved_good), (rid_late, moved_late) = await good, await late
        assert groups == [3]
        assert moved_good and not moved_late  # the second from the same base found the head moved
        assert (await a.response(rid_good)).status == "completed"
        assert (await a.response(rid_late)).status == "completed"
        assert (await a.conversation(conv_id)).head == (await a.response(rid_good)).last_node
    finally:
        await _close(stores)


@pytest.mark.parametrize("form", ["values", "unnest"])
async def test_group_commit_of_many_conversations_keeps_every_compare_and_swap(db_url, monkeypatch, form):
    """Two responses on each of ten conversations, all from the same heads and all committed in
    one pass of the loop: on PostgreSQL the first goes alone and the others, which wait for it,
    as one statement per round (each conversation once a round; a VALUES row per row for a
    small group, unnest'ed arrays for a larger one: each form forced here); on SQLite all as one
    transaction. Every response is stored, and on every conversation exactly one of its two moved
    the head, to that response's last node. A commit that breaks a constraint in such a group
    fails alone."""
    monkeypatch.setattr(statements, "PG_VALUES_COMMITS_MAX", 0 if form == "unnest" else 100)
    sizes: list[int] = []
    # private: how commits are grouped into statements shows in no result, only in this call
    real = PgGroups._commit_many

    async def recording(self, entries):
        sizes.append(len(entries))
        return await real(self, entries)

    monkeypatch.setattr(PgGroups, "_commit_many", recording)
    (a,) = stores = await _stores(db_url, 1)
    try:
        convs = []
        for k in range(10):
            conv_id = new_id("conv")
            await a.create_conversation(conv_id, conv_id, {}, [_message("user", f"seed {k}")])
            convs.append(await a.conversation(conv_id))
        results = await asyncio.gather(*(_commit(a, c.id, c.tree, c.head, c.head_depth, k)
                                         for k in range(2) for c in convs))
        if a.dialect == "postgresql":
            assert sizes == [1, 10, 9]  # the first alone, the others in two rounds
        for i, c in enumerate(convs):
            mine = [results[i], results[10 + i]]
            assert sum(moved for _, moved in mine) == 1
            winner = next(rid for rid, moved in mine if moved)
            after = await a.conversation(c.id)
            assert after.head == (await a.response(winner)).last_node
            assert after.head_depth == c.head_depth + 2
            for rid, _ in mine:
                assert (await a.response(rid)).status == "completed"

        # a response id stored already, in a group with two good commits
        sizes.clear()
        c0, c1, c2 = [await a.conversation(c.id) for c in convs[:3]]
        taken = results[0][0]

        async def duplicate() -> None:
            placed = place([_message("user", "dup")], c1.head, c1.head_depth, taken)
            row = {"id": taken, "status": "completed", "created_at": 1, "conversation_id": c1.id,
                   "previous_response_id": None, "tree": c1.tree, "base_node": c1.head,
                   "input_node": placed[0].node, "input_count": 1, "last_node": placed[0].node, "body": b"{}"}
            await a.commit_response(tree=c1.tree, placed=placed, response_rows=[row], conversation_id=c1.id,
                                    base=c1.head, new_head=placed[0].node)

        good = asyncio.ensure_future(_commit(a, c0.id, c0.tree, c0.head, c0.head_depth, 7))
        bad = asyncio.ensure_future(duplicate())
        other = asyncio.ensure_future(_commit(a, c2.id, c2.tree, c2.head, c2.head_depth, 8))
        with pytest.raises(Exception, match="(?i)unique|duplicate"):
            await bad
        for task in (good, other):
            rid, moved = await task
            assert moved and (await a.response(rid)).status == "completed"
        if a.dialect == "postgresql":  # the good one alone, then the other two together, then each alone
            assert sizes == [1, 2, 1, 1]
        assert (await a.conversation(c1.id)).head == c1.head  # the failed one moved nothing
    finally:
        await _close(stores)


async def test_reads_and_head_moves_of_one_loop_pass(db_url, monkeypatch):
    """The hot path's conversation reads and head moves made in one pass of the loop (on
    PostgreSQL the first alone, the others in one statement once it is back): each caller gets its own conversation and history,
    whether its head is the one this process knew (walk skipped) or was moved by another process
    (walked in the same statement); a conversation read twice, and one that does not exist, come
    back right. Moves: each conversation's head ends on its item, a second move of one
    conversation in the same pass lands after the first, and a move to an item of another tree
    or of a missing conversation moves nothing."""
    sizes: dict[str, list[int]] = {"read": [], "move": []}
    for kind, name in (("read", "reads"), ("move", "moves")):
        real = getattr(PgGroups, name)

        def recording(self, entries, _real=real, _kind=kind):
            sizes[_kind].append(len(entries))
            return _real(self, entries)

        monkeypatch.setattr(PgGroups, name, recording)
    a, b = stores = await _stores(db_url, 2)
    try:
        convs = []
        for k in range(6):
            conv_id = new_id("conv")
            await a.create_conversation(conv_id, conv_id, {}, [_message("user", f"seed {k}"),
                                                               _message("assistant", f"reply {k}")])
            convs.append(await a.conversation(conv_id))
        for c in convs:  # `a` now knows each head and has its history cached
            await a.conversation_with_history(c.id)
        # another process adds a turn to conversations 0 and 1 (their heads move under `a`)
        for c in convs[:2]:
            await _commit(b, c.id, c.tree, c.head, c.head_depth, 9)
        want = {c.id: await b.conversation_with_history(c.id) for c in convs}
        ids = [c.id for c in convs] + [convs[3].id, "conv_missing"]
        sizes["read"].clear()
        got = await asyncio.gather(*(a.conversation_with_history(i) for i in ids))
        if a.dialect == "postgresql":
            assert sizes["read"] == [1, len(ids) - 1]
        for conv_id, (conv, history) in zip(ids, got, strict=True):
            if conv_id == "conv_missing":
                assert conv is None and history == b""
                continue
            assert (conv, history) == want[conv_id]
        assert [orjson.loads(b"[" + got[0][1] + b"]")[-1]["content"]] == ["a9"]

        # moves: back to the seed item on 0..3, twice on 4 (the second wins), a foreign item, a missing conversation
        firsts = {c.id: (await a.walk(c.head, 0, 0))[0].item_id for c in convs}
        seconds = {c.id: (await a.walk(c.head, 1, 1))[0].item_id for c in convs}
        moves = [(c.id, firsts[c.id]) for c in convs[:4]]
        moves += [(convs[4].id, firsts[convs[4].id]), (convs[4].id, seconds[convs[4].id])]
        moves += [(convs[5].id, firsts[convs[0].id]), ("conv_missing", firsts[convs[0].id])]
        sizes["move"].clear()
        done = await asyncio.gather(*(a.move_head_to_item(c, i) for c, i in moves))
        if a.dialect == "postgresql":
            assert sizes["move"] == [1, len(moves) - 1]
        assert all(r is not None for r in done[:6]) and done[6] is None and done[7] is None
        for c in convs[:4]:
            assert (await b.conversation(c.id)).head_item == firsts[c.id]
        assert (await b.conversation(convs[4].id)).head_item == seconds[convs[4].id]
        assert (await b.conversation(convs[5].id)).head == convs[5].head
    finally:
        await _close(stores)


async def test_one_in_flight_sends_the_next_group_in_the_turn_the_last_result_came_in():
    """Groups that gather while one is out go one after another in the same task: the next
    group's flush starts as the last one's result is handled, without waiting for another pass
    of the loop (a task per group would start it one pass later)."""
    loop = asyncio.get_running_loop()
    groups: list[list] = []
    gates: list[asyncio.Future] = []

    async def flush(items):
        groups.append(list(items))
        gates.append(gate := loop.create_future())
        await gate
        return [i * 10 for i in items]

    batch = OneInFlight(flush)
    call = lambda i: asyncio.ensure_future(batch.submit(i))  # noqa: E731
    alone = call(1)
    await asyncio.sleep(0)
    waiting = [call(2), call(3)]
    await asyncio.sleep(0)
    gates[0].set_result(None)  # the lone flush ends: [2, 3] goes, in a task
    for _ in range(100):  # a few passes of the loop; a bound, not a timing
        if len(groups) >= 2:
            break
        await asyncio.sleep(0)
    later = [call(4), call(5)]
    await asyncio.sleep(0)
    assert groups == [[1], [2, 3]]
    gates[1].set_result(None)
    await asyncio.sleep(0)  # one pass: the task handles [2, 3]'s result and sends [4, 5] at once
    assert groups == [[1], [2, 3], [4, 5]]
    gates[2].set_result(None)
    assert [await f for f in (alone, *waiting, *later)] == [10, 20, 30, 40, 50]
    # idle again (no flush running, nobody waiting): the next call goes at once, alone
    idle = call(6)
    await asyncio.sleep(0)
    assert groups[-1] == [6] and len(groups) == 4
    gates[3].set_result(None)
    assert await idle == 60


async def test_one_in_flight_flushes_alone_when_idle_and_groups_what_waits_for_a_running_flush():
    """OneInFlight: a call that finds no flush running goes at once, alone; the calls made while
    it runs (in this pass of the loop or later ones) wait and go together when it ends; each
    caller gets its own result or exception, and a caller that gives up cancels nobody else's."""
    groups: list[list] = []
    release = asyncio.Event()

    async def flush(items):
        groups.append(list(items))
        if len(groups) == 1:
            await release.wait()
        return [ValueError(i) if i == "bad" else i * 2 for i in items]

    batch = OneInFlight(flush)
    call = lambda i: asyncio.ensure_future(batch.submit(i))  # noqa: E731
    first, second = call(1), call(2)
    await asyncio.sleep(0)
    assert groups == [[1]]  # the first went at once; the second waits for it
    await asyncio.sleep(0)
    later = [call(3), call("bad"), call(4)]
    gone = call(5)
    await asyncio.sleep(0)
    gone.cancel()  # its caller gave up
    await asyncio.sleep(0.01)
    assert groups == [[1]]  # nothing else starts while one runs
    release.set()
    assert await first == 2 and await second == 4
    assert await later[0] == 6 and await later[2] == 8
    with pytest.raises(ValueError):
        await later[1]
    assert groups == [[1], [2, 3, "bad", 4, 5]]
    assert await batch.submit(6) == 12 and groups[-1] == [6]  # idle again: alone, at once


def test_tree_rules_the_repository_executes():
    """`core.tree`'s rules, without a database: a delete re-hangs the rows below as new nodes in
    a line under the deleted item's parent; a fork points at the source's head or an item on its
    path; a page of a path reads one item more than it returns; the newest node holding an item
    is where a head moved to it goes."""
    from branchwise.core.tree import (
        Conversation,
        PathRow,
        fork_point,
        head_target,
        on_path,
        page_bounds,
        rehang,
    )

    below = [{"node": "n3", "parent": "n2", "depth": 3, "item_id": "c"},
             {"node": "n4", "parent": "n3", "depth": 4, "item_id": "d"}]
    copies, head = rehang(below, "n1", 2)
    assert [(c["item_id"], c["depth"]) for c in copies] == [("c", 2), ("d", 3)]
    assert copies[0]["parent"] == "n1" and copies[1]["parent"] == copies[0]["node"]
    assert head == copies[1]["node"] and {c["node"] for c in copies}.isdisjoint({"n3", "n4"})
    assert rehang([], "n1", 2) == ([], "n1")
    src = Conversation("conv_a", "t", "n4", "d", 4, "message", 1, "{}", None, None)
    assert fork_point(src, None) == ("n4", ("conv_a", "d"))
    assert fork_point(src, PathRow("n2", 2, "b", b"{}")) == ("n2", ("conv_a", "b"))
    assert page_bounds(4, 2, "asc", None) == (0, 2) and page_bounds(4, 2, "desc", None) == (2, 4)
    assert page_bounds(4, 2, "desc", 0) is None
    assert head_target([("new", 3), ("old", 1)]) == "new" and head_target([]) is None
    path = [PathRow("n4", 4, "d", b""), PathRow("n3", 3, "c", b"")]
    assert on_path([("x", 3), ("n3", 3)], path) == path[1] and on_path([("x", 3)], path) is None
