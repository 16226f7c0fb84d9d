"""Stored prompts: the /v1/prompts extension (raw HTTP: the SDK has no prompts resource) and
POST /v1/responses's `prompt` parameter (through the SDK), on SQLite and PostgreSQL.

A prompt version's `instructions` and `input` messages may hold `{{name}}` variables; a response
that names the prompt gives their values, and the model sees the rendered prompt before the
history, on that request only."""

from __future__ import annotations

import openai
import pytest

from .helpers import ANY, MODEL, check_error, check_sdk_error, post_sse
from .test_bad_input import Untouched

MISSING = "pmpt_" + "0" * 48
IMAGE = "data:image/png;base64,iVBORw0KGgo="


async def make(raw, **body) -> dict:
    r = await raw.post("/v1/prompts", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def test_create_version_read_list_delete(raw):
    p = await make(raw, instructions="You are a guide to {{city}}. Answer in {{ language }}.",
                   input=[{"role": "user", "content": "I arrive in {{city}} on {{day}}."}],
                   metadata={"team": "travel"})
    assert p["id"].startswith("pmpt_") and len(p["id"]) == 53
    assert {k: p[k] for k in ("object", "version", "variables", "metadata")} == {
        "object": "prompt", "version": "1", "variables": ["city", "language", "day"], "metadata": {"team": "travel"}}
    assert p["input"] == [{"type": "message", "role": "user", "content": "I arrive in {{city}} on {{day}}."}]
    assert set(p) == {"id", "object", "version", "created_at", "instructions", "input", "variables", "metadata"}

    v2 = (await raw.post(f"/v1/prompts/{p['id']}", json={"instructions": "Be brief about {{city}}."})).json()
    assert (v2["id"], v2["version"], v2["variables"], v2["input"]) == (p["id"], "2", ["city"], None)
    assert (await raw.get(f"/v1/prompts/{p['id']}")).json() == v2  # the latest
    assert (await raw.get(f"/v1/prompts/{p['id']}", params={"version": "1"})).json() == p

    other = await make(raw, instructions="Other.")
    page = (await raw.get("/v1/prompts")).json()  # newest first, each its latest version
    assert [x["id"] for x in page["data"]] == [other["id"], p["id"]] and page["has_more"] is False
    assert page["data"][1]["version"] == "2"
    one = (await raw.get("/v1/prompts", params={"limit": 1, "order": "asc"})).json()
    assert [x["id"] for x in one["data"]] == [p["id"]] and one["has_more"] is True
    rest = (await raw.get("/v1/prompts", params={"limit": 1, "order": "asc", "after": one["last_id"]})).json()
    assert [x["id"] for x in rest["data"]] == [other["id"]] and rest["has_more"] is False

    versions = (await raw.get(f"/v1/prompts/{p['id']}/versions")).json()
    assert [v["version"] for v in versions["data"]] == ["2", "1"] and versions["first_id"] == "2"
    asc = (await raw.get(f"/v1/prompts/{p['id']}/versions", params={"order": "asc", "after": "1"})).json()
    assert [v["version"] for v in asc["data"]] == ["2"]

    r = await raw.delete(f"/v1/prompts/{p['id']}")
    assert r.json() == {"id": p["id"], "object": "prompt.deleted", "deleted": True}
    for method, path in (("GET", f"/v1/prompts/{p['id']}"), ("GET", f"/v1/prompts/{p['id']}/versions"),
                         ("DELETE", f"/v1/prompts/{p['id']}"), ("POST", f"/v1/prompts/{p['id']}")):
        check_error(await raw.request(method, path, json={"instructions": "x"}), 404)
    assert [x["id"] for x in (await raw.get("/v1/prompts")).json()["data"]] == [other["id"]]


async def test_prompt_api_refuses_bad_input(raw, db_engine, mock):
    p = await make(raw, instructions="x")
    cases = [
        ("POST", "/v1/prompts", {}, 400, "instructions", "missing_required_parameter"),
        ("POST", "/v1/prompts", {"instructions": ""}, 400, "instructions", "missing_required_parameter"),
        ("POST", "/v1/prompts", {"instructions": "x", "model": "m"}, 400, "model", "unknown_parameter"),
        ("POST", "/v1/prompts", {"input": [{"role": "robot", "content": "x"}]}, 400, "input[0].role", None),
        ("POST", "/v1/prompts", {"instructions": 5}, 400, "instructions", "invalid_value"),
        ("POST", f"/v1/prompts/{p['id']}", {"input": []}, 400, "instructions", "missing_required_parameter"),
        ("GET", f"/v1/prompts/{p['id']}?version=0", None, 400, "version", "invalid_value"),
        ("GET", f"/v1/prompts/{p['id']}?version=x", None, 400, "version", "invalid_value"),
        ("GET", f"/v1/prompts/{p['id']}?version=99", None, 404, None, None),
        ("GET", f"/v1/prompts/{p['id']}/versions?after=abc", None, 400, "after", "invalid_value"),
        ("GET", "/v1/prompts?after=conv_" + "0" * 48, None, 400, "after", "invalid_value"),
        ("GET", "/v1/prompts?limit=101", None, 400, "limit", "invalid_value"),
        ("GET", "/v1/prompts/abc", None, 400, "prompt_id", "invalid_value"),
    ]
    for method, path, body, status, param, code in cases:
        async with Untouched(db_engine, mock, f"{method} {path} {body}"):
            r = await raw.request(method, path, json=body)
            check_error(r, status, ANY if param is None else param, code, case=f"{path} {body}")


async def test_a_response_uses_a_prompt(client, raw, mock):
    p = await make(raw, instructions="You are a guide to {{city}}.",
                   input=[{"role": "user", "content": "I arrive on {{day}}."},
                          {"role": "assistant", "content": "Welcome to {{city}}!"}])
    r = await client.responses.create(model=MODEL, input="Where to eat?",
                                      prompt={"id": p["id"], "variables": {"city": "Lisbon", "day": "Monday"}})
    assert r.status == "completed" and r.output_text == "[4 messages] Echo: Where to eat?"
    assert mock.requests[0]["messages"] == [
        {"role": "system", "content": "You are a guide to Lisbon."},
        {"role": "user", "content": "I arrive on Monday."},
        {"role": "assistant", "content": "Welcome to Lisbon!"},
        {"role": "user", "content": "Where to eat?"}]
    # the Response says which version it used
    assert r.prompt.id == p["id"] and r.prompt.version == "1"
    assert r.prompt.variables == {"city": "Lisbon", "day": "Monday"}
    assert (await client.responses.retrieve(r.id)).prompt.version == "1"
    # the prompt is not stored as input: a follow-up does not see it
    assert [it.type async for it in client.responses.input_items.list(r.id)] == ["message"]
    mock.clear()
    await client.responses.create(model=MODEL, previous_response_id=r.id, input="And then?")
    assert [m["content"] for m in mock.requests[0]["messages"]] == ["Where to eat?", r.output_text, "And then?"]

    # a new version is what an unversioned prompt means from now on; version "1" stays
    await raw.post(f"/v1/prompts/{p['id']}", json={"instructions": "Be brief ({{city}})."})
    mock.clear()
    r2 = await client.responses.create(model=MODEL, input="Hi", instructions="Answer in French.",
                                       prompt={"id": p["id"], "variables": {"city": "Porto"}})
    # the prompt's instructions, then the request's, in one system message
    assert mock.requests[0]["messages"] == [
        {"role": "system", "content": "Be brief (Porto).\n\nAnswer in French."}, {"role": "user", "content": "Hi"}]
    assert r2.prompt.version == "2" and r2.instructions == "Answer in French."
    mock.clear()
    await client.responses.create(model=MODEL, input="Hi", prompt={
        "id": p["id"], "version": "1", "variables": {"city": {"type": "input_text", "text": "Faro"}, "day": "Friday"}})
    assert mock.requests[0]["messages"][0] == {"role": "system", "content": "You are a guide to Faro."}

    # streamed, on a conversation: the same context; the conversation keeps only input and output
    conv = await client.conversations.create()
    mock.clear()
    events = await post_sse(raw, {"conversation": conv.id, "input": "Hello",
                                  "prompt": {"id": p["id"], "variables": {"city": "Braga"}}})
    assert events[-1][0] == "response.completed"
    assert events[-1][1]["response"]["prompt"] == {"id": p["id"], "version": "2", "variables": {"city": "Braga"}}
    assert mock.requests[0]["messages"][0] == {"role": "system", "content": "Be brief (Braga)."}
    assert [it.type async for it in client.conversations.items.list(conv.id)] == ["message", "message"]


async def test_image_and_file_variables(client, raw, mock):
    p = await make(raw, instructions="Describe things.",
                   input=[{"role": "user", "content": [{"type": "input_text", "text": "Look: {{photo}} and say {{what}}."}]}])
    await client.responses.create(model=MODEL, input="Go.", prompt={"id": p["id"], "variables": {
        "photo": {"type": "input_image", "image_url": IMAGE}, "what": "its colour"}})
    assert mock.requests[0]["messages"][1] == {"role": "user", "content": [
        {"type": "text", "text": "Look: "}, {"type": "image_url", "image_url": {"url": IMAGE, "detail": "auto"}},
        {"type": "text", "text": " and say its colour."}]}

    # an image only where a message's content can hold one
    q = await make(raw, instructions="Look at {{photo}}.")
    with pytest.raises(openai.BadRequestError) as e:
        await client.responses.create(model=MODEL, input="x", prompt={
            "id": q["id"], "variables": {"photo": {"type": "input_image", "image_url": IMAGE}}})
    check_sdk_error(e.value, 400, "prompt.variables.photo", "invalid_value")


async def test_a_bad_prompt_reference_stores_nothing(client, raw, db_engine, mock):
    p = await make(raw, instructions="Hello {{name}}.")
    cases = [
        ("unknown id", {"id": MISSING}, 404, "prompt.id", None),
        ("malformed id", {"id": "prompt_1"}, 400, "prompt.id", "invalid_value"),
        ("unknown version", {"id": p["id"], "version": "7", "variables": {"name": "x"}}, 404, "prompt.version", None),
        ("version not a number", {"id": p["id"], "version": "v1"}, 400, "prompt.version", "invalid_value"),
        ("version an integer", {"id": p["id"], "version": 1}, 400, "prompt.version", "invalid_value"),
        ("missing variable", {"id": p["id"]}, 400, "prompt.variables", "missing_required_parameter"),
        ("unknown variable", {"id": p["id"], "variables": {"name": "a", "age": "3"}}, 400,
         "prompt.variables.age", "invalid_value"),
        ("bad part", {"id": p["id"], "variables": {"name": {"type": "input_audio"}}}, 400,
         "prompt.variables.name.type", "invalid_value"),
        ("unknown field", {"id": p["id"], "variables": {"name": "a"}, "label": "prod"}, 400,
         "prompt.label", "unknown_parameter"),
        ("not an object", "pmpt_x", 400, "prompt", "invalid_value"),
    ]
    for case, prompt, status, param, code in cases:
        async with Untouched(db_engine, mock, case):
            r = await raw.post("/v1/responses", json={"model": MODEL, "input": "hi", "prompt": prompt})
            err = check_error(r, status, param, code, case=case)
            if status == 404:
                assert p["id"] in err["message"] or MISSING in err["message"]
    with pytest.raises(openai.NotFoundError) as e:
        await client.responses.create(model=MODEL, input="hi", prompt={"id": MISSING})
    assert e.value.body["param"] == "prompt.id"
