"""Parallel responses on one conversation: the three policies, with real concurrent requests
through the official SDK, on SQLite and PostgreSQL. Each test asserts what every request saw
(the upstream's request log) and what the tree holds afterwards."""

from __future__ import annotations

import asyncio

import openai
import pytest

from .helpers import new_conversation, serving, until

N = 16
DELAY = "[[delay=0.3]]"  # long enough for every request to overlap with the first


async def _conversation(client, text="We plan a trip."):
    return await new_conversation(client, text)


async def _all_items(client, conv_id):
    return [it async for it in client.conversations.items.list(conv_id, order="asc", limit=100)]


async def _tree(raw, conv_id):
    r = await raw.get(f"/v1/conversations/{conv_id}/tree", params={"limit": 1000})
    assert r.status_code == 200
    return r.json()


async def test_branch_all_run_from_the_same_head(client, raw, mock):
    conv = await _conversation(client)
    root = conv.model_extra["head"]
    results = await asyncio.gather(*(
        client.responses.create(model="m", conversation=conv.id, input=f"{DELAY} question {i}",
                                extra_body={"concurrency": "branch"})
        for i in range(N)
    ))
    assert [r.status for r in results] == ["completed"] * N
    assert len({r.id for r in results}) == N
    # every upstream call saw the same history: the first message and its own question
    assert len(mock.requests) == N
    assert {len(req["messages"]) for req in mock.requests} == {2}
    assert all(req["messages"][0]["content"] == "We plan a trip." for req in mock.requests)
    for r in results:
        assert r.output_text.startswith("[2 messages] Echo: question")
    # the tree holds all 16 branches under the old head; the head is the end of one of them
    tree = await _tree(raw, conv.id)
    nodes = tree["data"]
    inputs = [n for n in nodes if n["parent_id"] == root]
    assert len(inputs) == N
    outputs = [n for n in nodes if n["parent_id"] in {i["id"] for i in inputs}]
    assert len(outputs) == N
    assert {o["response_id"] for o in outputs} == {r.id for r in results}
    heads = {r.output[-1].id for r in results}
    assert tree["head"] in heads
    conv_now = await client.conversations.retrieve(conv.id)
    assert conv_now.model_extra["head"] == tree["head"]
    # the conversation reads as one line: first message, the winner's question and answer
    items = await _all_items(client, conv.id)
    assert len(items) == 3
    winner = next(r for r in results if r.output[-1].id == tree["head"])
    assert items[2].id == winner.output[-1].id


async def test_queue_makes_one_line_in_arrival_order(client, mock):
    conv = await _conversation(client)
    results = await asyncio.gather(*(
        client.responses.create(model="m", conversation=conv.id, input=f"{DELAY} turn {i}",
                                extra_body={"concurrency": "queue"})
        for i in range(N)
    ))
    assert [r.status for r in results] == ["completed"] * N
    # each call saw every earlier turn: 2, 4, ..., 32 messages, one call each
    counts = [len(req["messages"]) for req in mock.requests]
    assert counts == [2 + 2 * k for k in range(N)]
    # the history is one line, in the order the upstream served them
    items = await _all_items(client, conv.id)
    assert len(items) == 1 + 2 * N
    served = [req["messages"][-1]["content"] for req in mock.requests]
    history_questions = [it.content[0].text for it in items[1::2]]
    assert history_questions == served
    for k, req in enumerate(mock.requests):
        # what call k saw is exactly the history before its own turn
        assert [m["content"] for m in req["messages"][:-1]] == [
            it.content[0].text for it in items[: 1 + 2 * k]
        ]


async def test_reject_refuses_while_one_runs(client, raw, mock):
    conv = await _conversation(client)
    first = asyncio.create_task(client.responses.create(
        model="m", conversation=conv.id, input="[[delay=1.0]] the slow one", extra_body={"concurrency": "reject"}))
    await until(lambda: mock.requests, "the first request to reach the upstream")  # it runs upstream now
    others = await asyncio.gather(*(
        client.responses.create(model="m", conversation=conv.id, input=f"other {i}",
                                extra_body={"concurrency": "reject"})
        for i in range(N - 1)
    ), return_exceptions=True)
    for e in others:
        assert isinstance(e, openai.BadRequestError)
        assert e.status_code == 400
        err = e.body if "message" in e.body else e.body["error"]
        assert err["code"] == "conversation_locked"
        assert err["param"] == "conversation"
        assert err["type"] == "invalid_request_error"
        assert err["message"] == ("Another process is currently operating on this conversation. "
                                  "Please retry in a few seconds.")
    # an items append under `reject` is refused the same way
    r = await raw.post(f"/v1/conversations/{conv.id}/items",
                       json={"items": [{"role": "user", "content": "x"}], "concurrency": "reject"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "conversation_locked"
    done = await first
    assert done.status == "completed"
    assert len(mock.requests) == 1  # nothing refused reached the upstream
    items = await _all_items(client, conv.id)
    assert len(items) == 3
    assert items[-1].id == done.output[-1].id
    # once it finished, the conversation takes the next one
    after = await client.responses.create(model="m", conversation=conv.id, input="next",
                                          extra_body={"concurrency": "reject"})
    assert after.status == "completed"


async def test_queue_timeout_leaves_the_line(settings, mock):
    async with serving(settings.model_copy(update={"queue_timeout": 0.3})) as (_, client, raw):
        conv = await _conversation(client)
        slow = asyncio.create_task(client.responses.create(
            model="m", conversation=conv.id, input="[[delay=1.0]] slow", extra_body={"concurrency": "queue"}))
        await until(lambda: mock.requests, "the slow request to reach the upstream")
        r = await raw.post("/v1/responses", json={"model": "m", "conversation": conv.id, "input": "late",
                                                  "concurrency": "queue"})
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "conversation_queue_timeout"
        assert r.headers["x-should-retry"] == "false"
        assert (await slow).status == "completed"
        assert len(mock.requests) == 1
        # the line is empty: the one that timed out left no place in it behind, so a request
        # that refuses to wait (`reject`) goes through at once
        after = await client.responses.create(model="m", conversation=conv.id, input="next",
                                              extra_body={"concurrency": "reject"})
        assert after.status == "completed"


async def test_same_previous_response_id_in_parallel(client, mock):
    first = await client.responses.create(model="m", input="start here")
    mock.clear()
    results = await asyncio.gather(*(
        client.responses.create(model="m", previous_response_id=first.id, input=f"{DELAY} branch {i}")
        for i in range(12)
    ))
    assert [r.status for r in results] == ["completed"] * 12
    assert len({r.id for r in results}) == 12
    contexts = [[m["content"] for m in req["messages"][:-1]] for req in mock.requests]
    assert all(c == ["start here", first.output_text] for c in contexts)


@pytest.mark.parametrize("policy", ["branch", "queue"])
async def test_items_append_follows_the_policy(client, raw, mock, policy):
    conv = await _conversation(client)
    slow = asyncio.create_task(client.responses.create(
        model="m", conversation=conv.id, input="[[delay=0.5]] slow", extra_body={"concurrency": "queue"}))
    await until(lambda: mock.requests, "the slow request to reach the upstream")
    r = await raw.post(f"/v1/conversations/{conv.id}/items",
                       json={"items": [{"role": "user", "content": "appended"}], "concurrency": policy})
    assert r.status_code == 200
    done = await slow
    items = await _all_items(client, conv.id)
    texts = [it.content[0].text for it in items]
    if policy == "queue":
        # the append waited for the running response and landed after it
        assert texts == ["We plan a trip.", "[[delay=0.5]] slow", done.output_text, "appended"]
    else:
        # the append went in at once; the response, finishing later, stayed a sibling branch
        assert texts == ["We plan a trip.", "appended"]
