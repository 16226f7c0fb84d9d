"""End to end over real sockets: `branchwise serve` in a subprocess, the official SDK (sync and
async) and the forum's script from ../shared, unchanged."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from branchwise.store.connect import create_engine
from branchwise.store.leases import Leases
from branchwise.testing.mock_upstream import MockUpstream

from .conftest import require_shared
from .helpers import new_conversation, until

pytestmark = pytest.mark.e2e

DEMO = "examples/forum_branching_demo.py"  # under the forum's shared directory


def _env(db_url: str, mock=None, **extra: str) -> dict[str, str]:
    env = {"BRANCHWISE_DATABASE_URL": db_url}
    if mock is not None:
        env["BRANCHWISE_UPSTREAM_BASE_URL"] = mock.url
    env.update(extra)
    return env


@pytest.mark.timeout(240)  # a server start (60 s at most) and the script (120 s at most)
def test_forum_demo_runs_unchanged(serve, db_url, mock):
    demo = require_shared(DEMO)
    server = serve(_env(db_url, mock))
    env = {**os.environ, "OPENAI_BASE_URL": f"{server.url}/v1", "OPENAI_API_KEY": "anything"}
    out = subprocess.run([sys.executable, str(demo)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Base conversation id: conv_" in out.stdout
    assert "First answer:\n[2 messages] Echo: Give me a quick 3-bullet itinerary." in out.stdout
    assert "Branch A (formal agent):\n[4 messages] Echo: Continue this conversation, but respond like a very formal" \
        in out.stdout
    assert "Branch B (funny buddy):\n[4 messages] Echo: Continue this conversation, but respond like a funny" \
        in out.stdout
    # each branch's upstream call received the whole history: 4 messages
    first, branch_a, branch_b = mock.requests
    assert len(first["messages"]) == 2
    for req, style in ((branch_a, "very formal travel agent"), (branch_b, "funny travel buddy")):
        msgs = req["messages"]
        assert len(msgs) == 4
        assert [m["role"] for m in msgs] == ["user", "user", "assistant", "user"]
        assert msgs[0]["content"].startswith("We are planning a weekend trip to Paris.")
        assert msgs[1]["content"] == "Give me a quick 3-bullet itinerary."
        assert msgs[2]["content"] == "[2 messages] Echo: Give me a quick 3-bullet itinerary."
        assert style in msgs[3]["content"]


@pytest.fixture
def slow_mock():
    # every reply takes 0.3 s, so requests a client sends at once really overlap
    with MockUpstream(delay=0.3) as m:
        yield m


@pytest.mark.timeout(240)  # a server start (60 s at most) and the script (120 s at most)
def test_parallel_branches_example(serve, db_url, slow_mock):
    mock = slow_mock
    server = serve(_env(db_url, mock))
    env = {**os.environ, "OPENAI_BASE_URL": f"{server.url}/v1", "OPENAI_API_KEY": "anything"}
    example = Path(__file__).resolve().parent.parent / "examples" / "parallel_branches.py"
    out = subprocess.run([sys.executable, str(example)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # both follow-ups ran at once from the same head: each saw 4 messages
    assert [len(r["messages"]) for r in mock.requests] == [2, 4, 4]
    assert "The tree holds 7 items" in out.stdout
    assert "After choosing branch B the conversation reads 5 items, ending with:\n[4 messages] Echo: Continue, " \
           "but respond like a funny travel buddy." in out.stdout


def test_healthz_and_models(serve, db_url, mock, tmp_path):
    cfg = tmp_path / "branchwise.toml"
    cfg.write_text(
        f'[[upstreams]]\nname = "a"\nbase_url = "{mock.url}"\nmodels = ["alpha", "beta-*"]\n'
        f'[[upstreams]]\nname = "b"\nbase_url = "{mock.url}"\nmodels = ["gamma"]\nsupports_n = false\n'
    )
    server = serve({"BRANCHWISE_DATABASE_URL": db_url, "BRANCHWISE_CONFIG": str(cfg)})
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
    assert sorted(m.id for m in client.models.list()) == ["alpha", "gamma"]
    assert client.responses.create(model="beta-1", input="hi").output_text == "[1 messages] Echo: hi"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="delta", input="hi")
    assert e.value.code == "model_not_found"


# ------------------------------------------------------------------ two processes, one PostgreSQL


@pytest.fixture
def two_servers(serve, pg_empty, mock):
    a = serve(_env(pg_empty, mock))
    b = serve(_env(pg_empty, mock))
    clients = [openai.AsyncOpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0) for s in (a, b)]
    clients[1].test_url = b.url
    return clients


async def _new_conv(client):
    return await new_conversation(client, "shared start")


async def test_two_processes_branch(two_servers, mock):
    a, b = two_servers
    conv = await _new_conv(a)
    results = await asyncio.gather(*(
        (a, b)[i % 2].responses.create(model="m", conversation=conv.id, input=f"[[delay=0.3]] q{i}",
                                       extra_body={"concurrency": "branch"})
        for i in range(16)
    ))
    assert all(r.status == "completed" for r in results)
    assert {len(r["messages"]) for r in mock.requests} == {2}
    tree = httpx.get(f"{b.test_url}/v1/conversations/{conv.id}/tree", params={"limit": 1000}).json()
    assert tree["head"] in {r.output[-1].id for r in results}
    assert len([n for n in tree["data"] if n["type"] == "message" and n["role"] == "assistant"]) == 16


async def test_two_processes_queue(two_servers, mock):
    a, b = two_servers
    conv = await _new_conv(a)
    results = await asyncio.gather(*(
        (a, b)[i % 2].responses.create(model="m", conversation=conv.id, input=f"[[delay=0.1]] t{i}",
                                       extra_body={"concurrency": "queue"})
        for i in range(16)
    ))
    assert all(r.status == "completed" for r in results)
    assert [len(r["messages"]) for r in mock.requests] == [2 + 2 * k for k in range(16)]
    items = [it async for it in b.conversations.items.list(conv.id, order="asc", limit=100)]
    assert len(items) == 33
    assert [it.content[0].text for it in items[1::2]] == [r["messages"][-1]["content"] for r in mock.requests]


async def test_two_processes_reject(two_servers, mock):
    a, b = two_servers
    conv = await _new_conv(a)
    slow = asyncio.create_task(a.responses.create(model="m", conversation=conv.id, input="[[delay=1.0]] slow",
                                                  extra_body={"concurrency": "reject"}))
    await until(lambda: mock.requests, "the slow request to reach the upstream")
    others = await asyncio.gather(*(
        (b, a)[i % 2].responses.create(model="m", conversation=conv.id, input=f"o{i}",
                                       extra_body={"concurrency": "reject"})
        for i in range(15)
    ), return_exceptions=True)
    assert all(isinstance(e, openai.BadRequestError) and e.code == "conversation_locked" for e in others)
    assert (await slow).status == "completed"
    assert len(mock.requests) == 1


async def test_workers_share_one_line(serve, db_url, mock):
    """`branchwise serve --workers 2`: two processes behind one port stay correct on both databases."""
    server = serve(_env(db_url, mock), workers=2)
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)
    conv = await _new_conv(client)
    results = await asyncio.gather(*(
        client.responses.create(model="m", conversation=conv.id, input=f"[[delay=0.05]] t{i}",
                                extra_body={"concurrency": "queue"})
        for i in range(12)
    ))
    assert all(r.status == "completed" for r in results)
    assert [len(r["messages"]) for r in mock.requests] == [2 + 2 * k for k in range(12)]
    items = [it async for it in client.conversations.items.list(conv.id, order="asc", limit=100)]
    assert len(items) == 25
    mock.clear()
    branches = await asyncio.gather(*(
        client.responses.create(model="m", conversation=conv.id, input=f"[[delay=0.2]] b{i}")
        for i in range(8)
    ))
    assert all(r.status == "completed" for r in branches)
    assert {len(r["messages"]) for r in mock.requests} == {26}


async def test_client_disconnect_leaves_the_queue(serve, db_url, mock):
    server = serve(_env(db_url, mock))
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    conv = await _new_conv(client)
    slow = asyncio.create_task(client.responses.create(
        model="m", conversation=conv.id, input="[[delay=2.0]] slow", extra_body={"concurrency": "queue"}))
    await until(lambda: mock.requests, "the slow request to reach the upstream")
    engine = create_engine(db_url)
    leases = Leases(engine)
    try:
        async with httpx.AsyncClient(timeout=0.5) as h:
            with pytest.raises(httpx.ReadTimeout):
                await h.post(f"{server.url}/v1/responses", json={
                    "model": "m", "conversation": conv.id, "input": "impatient", "concurrency": "queue"})
        deadline = time.monotonic() + 5
        while len(await leases.live(conv.id)) > 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(await leases.live(conv.id)) == 1  # only the running one is left in line
        assert (await slow).status == "completed"
        await asyncio.sleep(0.3)
        assert len(mock.requests) == 1  # the impatient one never ran
        assert await leases.live(conv.id) == []
    finally:
        await engine.dispose()


@pytest.mark.embedded
def test_embedded_model_end_to_end(serve, tmp_path):
    """No upstream configured: the embedded SmolLM2 answers any model name, for real."""
    server = serve({"BRANCHWISE_DATABASE_URL": f"sqlite:///{tmp_path / 'e.db'}"})
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
    assert [m.id for m in client.models.list()] == ["SmolLM2-135M-Instruct"]
    conv = client.conversations.create(items=[{"role": "user", "content": "We are planning a trip to Paris."}])
    r = client.responses.create(model="gpt-4.1-mini", conversation=conv.id, input="Name one museum.",
                                max_output_tokens=24, temperature=0)
    assert r.status in ("completed", "incomplete")
    assert r.output_text.strip()
    assert r.usage.input_tokens > 0 and 0 < r.usage.output_tokens <= 25
    items = list(client.conversations.items.list(conv.id, order="asc"))
    assert [i.role for i in items] == ["user", "user", "assistant"]
    events = list(client.responses.create(model="gpt-4.1-mini", previous_response_id=r.id, input="Why?",
                                          max_output_tokens=16, temperature=0, stream=True))
    # a tiny model may well hit the token limit: the stream then ends `response.incomplete`
    assert events[0].type == "response.created"
    assert events[-1].type in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas and deltas == events[-1].response.output_text
    assert client.responses.retrieve(events[-1].response.id).output_text == deltas
