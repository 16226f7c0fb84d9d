"""Projects: every stored object belongs to the project of the key that made it, and another
project's id answers exactly what an unknown id answers, on every route.

The walk covers every route of the app's table (`api.app.ROUTES`): a route without a case here
fails `test_every_route_has_a_case`, so a route added later cannot forget the check."""

from __future__ import annotations

import asyncio
import json

import openai
import orjson
import pytest

from branchwise.api.app import ROUTES
from branchwise.app import create_app
from branchwise.core.ids import new_id
from branchwise.settings import Settings

from .helpers import MODEL, served, until
from .teams import make_key, raw_client

# Routes that hold no stored object (nothing to isolate), or that only make the caller's own
# objects and can name no other (what they make is then checked by the routes that read it).
NO_OBJECTS = {("GET", "/healthz"), ("GET", "/v1/models"), ("GET", "/openapi.json"), ("POST", "/v1/prompts")}


def _resp(**body):
    return {"model": MODEL, "input": "hi", **body}


# (method, path) -> requests made with project A's ids (`i`): (method, url, json body or None).
# `i["b_conv"]` is project B's own conversation, the same in both walks.
CASES = {
    ("POST", "/v1/responses"): lambda i: [
        ("POST", "/v1/responses", _resp(conversation=i["conv"])),
        ("POST", "/v1/responses", _resp(conversation=i["conv"], stream=True)),
        ("POST", "/v1/responses", _resp(conversation=i["conv"], background=True)),
        ("POST", "/v1/responses", _resp(conversation=i["conv"], concurrency="queue")),
        ("POST", "/v1/responses", _resp(previous_response_id=i["resp"])),
        ("POST", "/v1/responses", _resp(previous_response_id=i["resp"], stream=True)),
        ("POST", "/v1/responses", _resp(input=[{"type": "item_reference", "id": i["item"]}])),
        ("POST", "/v1/responses", _resp(conversation=i["b_conv"], input=[{"type": "item_reference",
                                                                            "id": i["item"]}])),
        ("POST", "/v1/responses", _resp(prompt={"id": i["prompt"]})),
        ("POST", "/v1/responses", _resp(prompt={"id": i["prompt"], "version": "1"})),
    ],
    ("POST", "/v1/conversations/{conversation_id}/head"): lambda i: [
        ("POST", f"/v1/conversations/{i['conv']}/head", {"item_id": i["item"]}),
        ("POST", f"/v1/conversations/{i['b_conv']}/head", {"item_id": i["item"]}),
    ],
    ("POST", "/v1/responses/input_tokens"): lambda i: [
        ("POST", "/v1/responses/input_tokens", {"model": MODEL, "input": "hi", "conversation": i["conv"]}),
        ("POST", "/v1/responses/input_tokens", {"model": MODEL, "input": "hi", "previous_response_id": i["resp"]}),
        ("POST", "/v1/responses/input_tokens", {"model": MODEL, "input": [{"type": "item_reference",
                                                                          "id": i["item"]}]}),
    ],
    ("POST", "/v1/responses/compact"): lambda i: [
        ("POST", "/v1/responses/compact", {"model": MODEL, "conversation": i["conv"]}),
        ("POST", "/v1/responses/compact", {"model": MODEL, "previous_response_id": i["resp"]}),
        ("POST", "/v1/responses/compact", {"model": MODEL, "input": [{"type": "item_reference", "id": i["item"]}]}),
    ],
    ("GET", "/v1/responses/{response_id}"): lambda i: [
        ("GET", f"/v1/responses/{i['resp']}", None),
        ("GET", f"/v1/responses/{i['resp']}?stream=true", None),
        ("GET", f"/v1/responses/{i['stream']}?stream=true&starting_after=2", None),
        ("GET", f"/v1/responses/{i['bg']}", None),
    ],
    ("DELETE", "/v1/responses/{response_id}"): lambda i: [("DELETE", f"/v1/responses/{i['resp']}", None)],
    ("POST", "/v1/responses/{response_id}/cancel"): lambda i: [
        ("POST", f"/v1/responses/{i['bg']}/cancel", None), ("POST", f"/v1/responses/{i['resp']}/cancel", None)],
    ("GET", "/v1/responses/{response_id}/input_items"): lambda i: [
        ("GET", f"/v1/responses/{i['resp']}/input_items", None)],
    ("POST", "/v1/conversations"): lambda i: [
        ("POST", "/v1/conversations", {"items": [{"type": "item_reference", "id": i["item"]}]})],
    ("GET", "/v1/conversations/{conversation_id}"): lambda i: [("GET", f"/v1/conversations/{i['conv']}", None)],
    ("POST", "/v1/conversations/{conversation_id}"): lambda i: [
        ("POST", f"/v1/conversations/{i['conv']}", {"metadata": {"owner": "b"}})],
    ("DELETE", "/v1/conversations/{conversation_id}"): lambda i: [
        ("DELETE", f"/v1/conversations/{i['conv']}", None)],
    ("POST", "/v1/conversations/{conversation_id}/items"): lambda i: [
        ("POST", f"/v1/conversations/{i['conv']}/items", {"items": [{"role": "user", "content": "from b"}]}),
        ("POST", f"/v1/conversations/{i['b_conv']}/items", {"items": [{"type": "item_reference",
                                                                        "id": i["item"]}]}),
    ],
    ("GET", "/v1/conversations/{conversation_id}/items"): lambda i: [
        ("GET", f"/v1/conversations/{i['conv']}/items", None),
        ("GET", f"/v1/conversations/{i['b_conv']}/items?after={i['item']}", None),
    ],
    ("GET", "/v1/conversations/{conversation_id}/items/{item_id}"): lambda i: [
        ("GET", f"/v1/conversations/{i['conv']}/items/{i['item']}", None),
        ("GET", f"/v1/conversations/{i['b_conv']}/items/{i['item']}", None),
    ],
    ("DELETE", "/v1/conversations/{conversation_id}/items/{item_id}"): lambda i: [
        ("DELETE", f"/v1/conversations/{i['conv']}/items/{i['item']}", None),
        ("DELETE", f"/v1/conversations/{i['b_conv']}/items/{i['item']}", None),
    ],
    ("POST", "/v1/conversations/{conversation_id}/fork"): lambda i: [
        ("POST", f"/v1/conversations/{i['conv']}/fork", {}),
        ("POST", f"/v1/conversations/{i['b_conv']}/fork", {"item_id": i["item"]}),
    ],
    ("GET", "/v1/conversations/{conversation_id}/tree"): lambda i: [
        ("GET", f"/v1/conversations/{i['conv']}/tree", None),
        ("GET", f"/v1/conversations/{i['b_conv']}/tree?after={i['item']}", None),
    ],
    # the listings: B's lists never show A's objects
    ("GET", "/v1/conversations"): lambda i: [("GET", "/v1/conversations", None),
                                             ("GET", "/v1/conversations?metadata[owner]=a", None)],
    ("GET", "/v1/prompts"): lambda i: [("GET", "/v1/prompts", None)],
    ("GET", "/v1/prompts/{prompt_id}"): lambda i: [
        ("GET", f"/v1/prompts/{i['prompt']}", None), ("GET", f"/v1/prompts/{i['prompt']}?version=1", None)],
    ("POST", "/v1/prompts/{prompt_id}"): lambda i: [
        ("POST", f"/v1/prompts/{i['prompt']}", {"instructions": "b's version"})],
    ("DELETE", "/v1/prompts/{prompt_id}"): lambda i: [("DELETE", f"/v1/prompts/{i['prompt']}", None)],
    ("GET", "/v1/prompts/{prompt_id}/versions"): lambda i: [
        ("GET", f"/v1/prompts/{i['prompt']}/versions", None)],
}
# answered with B's own objects: compared by what they show
LISTS = {("GET", "/v1/conversations"), ("GET", "/v1/prompts")}


def test_every_route_has_a_case():
    """A route added to the app needs a case in CASES (or a place in NO_OBJECTS)."""
    missing = [(m, p) for m, p, _ in ROUTES if (m, p) not in CASES and (m, p) not in NO_OBJECTS]
    assert not missing, f"routes without a project-isolation case in tests/test_projects.py: {missing}"


@pytest.fixture
async def two_projects(db_url, mock):
    _, a_secret = make_key(db_url, "team-a")
    _, b_secret = make_key(db_url, "team-b")
    app = create_app(Settings(database_url=db_url, upstream_base_url=mock.url))
    async with app.router.lifespan_context(app):
        async with raw_client(app, a_secret) as a, raw_client(app, b_secret) as b:
            yield app, a, b


async def _ok(resp) -> dict:
    assert resp.status_code == 200, resp.text
    return resp.json()


async def _objects_of_a(a) -> dict[str, str]:
    conv = await _ok(await a.post("/v1/conversations", json={"items": [{"role": "user", "content": "secret plan"}],
                                                              "metadata": {"owner": "a"}}))
    resp = await _ok(await a.post("/v1/responses", json=_resp(conversation=conv["id"])))
    item = (await _ok(await a.get(f"/v1/conversations/{conv['id']}/items?order=asc")))["data"][0]["id"]
    stream = await a.post("/v1/responses", json=_resp(stream=True))
    assert stream.status_code == 200
    stream_id = orjson.loads(stream.text.split("data: ", 2)[1].split("\n", 1)[0])["response"]["id"]
    bg = await _ok(await a.post("/v1/responses", json=_resp(background=True, input="[[delay=30]] slow")))
    prompt = await _ok(await a.post("/v1/prompts", json={"instructions": "a's secret prompt"}))
    return {"conv": conv["id"], "resp": resp["id"], "item": item, "stream": stream_id, "bg": bg["id"],
            "prompt": prompt["id"]}


def _unknown(ids: dict[str, str]) -> dict[str, str]:
    """Ids of the same kinds that exist nowhere."""
    return {k: new_id(v.split("_", 1)[0]) for k, v in ids.items()}


async def test_another_projects_ids_answer_as_unknown_ids_on_every_route(two_projects, mock):
    app, a, b = two_projects
    ids = await _objects_of_a(a)
    unknown = _unknown(ids)
    b_conv = (await _ok(await b.post("/v1/conversations", json={})))["id"]
    before = {k: (await a.get(path)).json() for k, path in (
        ("conv", f"/v1/conversations/{ids['conv']}"), ("resp", f"/v1/responses/{ids['resp']}"),
        ("items", f"/v1/conversations/{ids['conv']}/items"), ("prompt", f"/v1/prompts/{ids['prompt']}/versions"))}
    await until(lambda: any("slow" in str(r) for r in mock.requests), "the background response's model call")
    mock.clear()
    routes = {(m, p) for m, p, _ in ROUTES}
    checked = 0
    for route, case in CASES.items():
        if route not in routes:
            continue
        theirs = case({**ids, "b_conv": b_conv})
        nobodys = case({**unknown, "b_conv": b_conv})
        for (method, url, body), (_, url_u, body_u) in zip(theirs, nobodys, strict=True):
            got = await b.request(method, url, json=body)
            if route in LISTS:
                assert got.status_code == 200, got.text
                assert not any(v in got.text for v in ids.values()), f"{method} {url} shows project A's objects"
                continue
            expected = await b.request(method, url_u, json=body_u)
            assert expected.status_code >= 400, f"{method} {url_u}: {expected.status_code} {expected.text}"
            text = got.text
            for k, v in ids.items():
                text = text.replace(v, unknown[k])
            assert (got.status_code, orjson.loads(text)) == (expected.status_code, expected.json()), \
                f"{method} {url}: another project's id answered {got.status_code} {got.text}, an unknown id " \
                f"{expected.status_code} {expected.text}"
            checked += 1
    assert checked >= 30
    assert mock.requests == []  # no model call was made for project B's refused requests
    # and A's objects are as they were: nothing of B's requests touched them
    after = {k: (await a.get(path)).json() for k, path in (
        ("conv", f"/v1/conversations/{ids['conv']}"), ("resp", f"/v1/responses/{ids['resp']}"),
        ("items", f"/v1/conversations/{ids['conv']}/items"), ("prompt", f"/v1/prompts/{ids['prompt']}/versions"))}
    assert after == before
    assert (await a.get(f"/v1/responses/{ids['bg']}")).json()["status"] in ("queued", "in_progress")
    assert (await a.post(f"/v1/responses/{ids['bg']}/cancel")).json()["status"] == "cancelled"


async def test_each_project_sees_its_own_objects(two_projects):
    """The same requests made by two projects each see their own: an item reference, a
    previous response, a fork, a stream replay."""
    app, a, b = two_projects
    for c in (a, b):
        conv = await _ok(await c.post("/v1/conversations", json={"items": [{"role": "user", "content": "x"}]}))
        r = await _ok(await c.post("/v1/responses", json=_resp(conversation=conv["id"])))
        r2 = await _ok(await c.post("/v1/responses", json=_resp(previous_response_id=r["id"], input="again")))
        assert r2["output"][0]["content"][0]["text"].startswith("[4 messages]")
        item = r["output"][0]["id"]
        r3 = await _ok(await c.post("/v1/responses", json=_resp(input=[{"type": "item_reference", "id": item}])))
        assert r3["status"] == "completed"
        fork = await _ok(await c.post(f"/v1/conversations/{conv['id']}/fork", json={"item_id": item}))
        assert (await _ok(await c.get(f"/v1/conversations/{fork['id']}")))["id"] == fork["id"]
        replay = await c.get(f"/v1/responses/{r['id']}?stream=true")
        assert replay.status_code == 200 and "response.completed" in replay.text


async def test_a_stream_started_by_one_project_is_stored_in_it(two_projects):
    """A stored stream runs in a task of its own after the request: it still belongs to the
    project that started it."""
    app, a, b = two_projects
    async with a.stream("POST", "/v1/responses", json=_resp(stream=True, input="[[chunk_delay=0.02]] one two three")) as s:
        first = None
        async for line in s.aiter_lines():
            if line.startswith("data: "):
                first = orjson.loads(line[6:])["response"]["id"]
                break
    await until(lambda: _status(a, first), "the stream to finish")
    assert (await b.get(f"/v1/responses/{first}")).status_code == 404


async def _status(c, rid: str) -> bool:
    r = await c.get(f"/v1/responses/{rid}")
    return r.status_code == 200 and r.json()["status"] == "completed"


async def test_a_websocket_turn_sees_only_its_projects_objects(db_url, mock):
    """WebSocket mode acts for the key of its handshake: another project's response or
    conversation answers as an unknown one."""
    _, a_secret = make_key(db_url, "team-a")
    _, b_secret = make_key(db_url, "team-b")
    async with served(Settings(database_url=db_url, upstream_base_url=mock.url)) as (_, url):
        a = openai.AsyncOpenAI(api_key=a_secret, base_url=f"{url}/v1", max_retries=0)
        b = openai.AsyncOpenAI(api_key=b_secret, base_url=f"{url}/v1", max_retries=0)
        theirs = await a.responses.create(model=MODEL, input="a's")
        conv = await a.conversations.create()
        got = {}
        async with b.responses.connect() as conn:
            for name, body in (("resp", {"previous_response_id": theirs.id}),
                               ("unknown_resp", {"previous_response_id": new_id("resp")}),
                               ("conv", {"conversation": conv.id}), ("unknown_conv", {"conversation": new_id("conv")})):
                await conn.send({"type": "response.create", "model": MODEL, "input": "b's", **body})
                got[name] = json.loads(await asyncio.wait_for(conn.recv_bytes(), 30))
        for mine, unknown in (("resp", "unknown_resp"), ("conv", "unknown_conv")):
            assert got[mine]["type"] == "error" and got[mine]["status"] == got[unknown]["status"], got
            assert got[mine]["error"]["code"] == got[unknown]["error"]["code"], got
        assert got["resp"]["error"]["code"] == "previous_response_not_found"
        async with a.responses.connect() as conn:  # A's own key continues it
            await conn.send({"type": "response.create", "model": MODEL, "input": "more",
                             "previous_response_id": theirs.id})
            assert json.loads(await asyncio.wait_for(conn.recv_bytes(), 30))["type"] == "response.created"
