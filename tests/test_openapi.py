"""`GET /openapi.json`, and schemathesis fuzzing the real server against it and against OpenAI's
own spec: hostile input is normal input, so not one generated request may get a 5xx.

The fuzz runs are bounded (a fixed number of examples per operation, hypothesis in its
deterministic mode) and use the schemathesis CLI in a subprocess against `branchwise serve`
with the mock upstream. A failing run prints schemathesis's report (each failure with a `curl`
line that reproduces it) and the server's log (the traceback).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate

from branchwise.api.app import ROUTES
from branchwise.api.openapi import OPERATIONS, document
from tests.conftest import ROOT, require_shared
from tests.helpers import MODEL

OPENAI_SPEC = "reference/openai-responses-conversations.openapi.json"
SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"  # the CLI installed beside this Python
# examples per operation in the random phases; a deeper run by hand: BRANCHWISE_FUZZ_EXAMPLES=200
# (and BRANCHWISE_FUZZ_PHASES=examples,coverage,fuzzing,stateful for every phase on every run)
MAX_EXAMPLES = int(os.environ.get("BRANCHWISE_FUZZ_EXAMPLES", "10"))


# ---------------------------------------------------------------- the document


def test_every_route_is_documented():
    routes = {(method, path) for method, path, _ in ROUTES}
    assert routes == set(OPERATIONS), "api.openapi.OPERATIONS must describe every route of api.app.ROUTES"
    doc = document(ROUTES)
    assert {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops} == routes


def test_document_is_valid_openapi_with_the_extensions():
    doc = document(ROUTES)
    validate(doc)  # OpenAPI 3.1, with every $ref resolvable
    assert doc["openapi"] == "3.1.0"
    schemas = doc["components"]["schemas"]
    create = schemas["CreateResponse"]["properties"]
    assert {"concurrency", "n"} <= set(create) and create["n"]["maximum"] == 8
    assert "concurrency" in schemas["AddItems"]["properties"]
    assert {"head", "forked_from"} <= set(schemas["Conversation"]["properties"])
    for path in ("/fork", "/head", "/tree"):
        assert f"/v1/conversations/{{conversation_id}}{path}" in doc["paths"]
    body = doc["paths"]["/v1/conversations/{conversation_id}/head"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/MoveHead"}


async def test_served_at_openapi_json(raw):
    r = await raw.get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == json.loads(json.dumps(document(ROUTES)))


# ---------------------------------------------------------------- replies, field by field


def _check_reply(doc: dict, name: str, instance, where: str = "") -> None:
    """`instance` is valid against the schema `name` of `doc`, and every key of every object in
    it is a property its schema names (the document says every field the server sends)."""
    root = {"components": doc["components"]}
    schema = {"$ref": f"#/components/schemas/{name}"}
    jsonschema.Draft202012Validator({**root, **schema}).validate(instance)
    _keys_named(root, schema, instance, where or name)


def _resolve(root: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = root["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _keys_named(root: dict, schema: dict, instance, where: str) -> None:
    schema = _resolve(root, schema)
    if "anyOf" in schema:  # the branch the instance is valid against
        for branch in schema["anyOf"]:
            if jsonschema.Draft202012Validator({**root, **branch}).is_valid(instance):
                _keys_named(root, branch, instance, where)
                return
        raise AssertionError(f"{where}: no branch of {schema} fits")
    if isinstance(instance, dict) and "properties" in schema:
        unnamed = set(instance) - set(schema["properties"])
        assert not unnamed, f"{where}: fields {sorted(unnamed)} are not in the document"
        for key, value in instance.items():
            _keys_named(root, schema["properties"][key], value, f"{where}.{key}")
    elif isinstance(instance, list) and "items" in schema:
        for i, value in enumerate(instance):
            _keys_named(root, schema["items"], value, f"{where}[{i}]")


async def test_every_field_of_every_reply_is_documented(client, raw, mock):
    doc = document(ROUTES)
    tool = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}
    conv = (await raw.post("/v1/conversations", json={"metadata": {"k": "v"}, "items": [
        {"role": "user", "content": [{"type": "input_text", "text": "hi"},
                                     {"type": "input_image", "image_url": "data:image/png;base64,AA=="}]}]})).json()
    _check_reply(doc, "Conversation", conv)
    prompt = (await raw.post("/v1/prompts", json={"instructions": "Be {{x}}.", "input": [
        {"role": "user", "content": "hi"}]})).json()
    _check_reply(doc, "Prompt", prompt)
    _check_reply(doc, "PromptList", (await raw.get("/v1/prompts")).json())
    _check_reply(doc, "PromptList", (await raw.get(f"/v1/prompts/{prompt['id']}/versions")).json())
    called = (await raw.post("/v1/responses", json={
        "model": MODEL, "conversation": conv["id"], "tools": [tool], "input": "call [[tool]] [[reasoning=hmm]]",
        "prompt": {"id": prompt["id"], "variables": {"x": "brief"}}, "metadata": {"a": "b"}, "n": 2,
        "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}}}})).json()
    _check_reply(doc, "Response", called)
    call = next(it for it in called["output"] if it["type"] == "function_call")
    answered = (await raw.post("/v1/responses", json={"model": MODEL, "conversation": conv["id"], "input": [
        {"type": "function_call_output", "call_id": call["call_id"], "output": "42"}]})).json()
    _check_reply(doc, "Response", answered)
    failed = (await raw.post("/v1/responses", json={"model": MODEL, "input": "x [[fail=500]]"})).json()
    _check_reply(doc, "Response", failed)
    compacted = (await raw.post("/v1/responses/compact", json={"model": MODEL, "input": "hi"})).json()
    _check_reply(doc, "CompactedResponse", compacted)
    await raw.post(f"/v1/conversations/{conv['id']}/items", json={"items": [compacted["output"][-1]]})
    items = (await raw.get(f"/v1/conversations/{conv['id']}/items")).json()
    assert {it["type"] for it in items["data"]} == {"message", "function_call", "function_call_output",
                                                    "reasoning", "compaction"}
    _check_reply(doc, "ItemList", items)
    _check_reply(doc, "ConversationTree", (await raw.get(f"/v1/conversations/{conv['id']}/tree")).json())
    _check_reply(doc, "ConversationList", (await raw.get("/v1/conversations")).json())
    _check_reply(doc, "ModelList", (await raw.get("/v1/models")).json())
    _check_reply(doc, "InputTokens", (await raw.post("/v1/responses/input_tokens", json={"input": "x"})).json())
    _check_reply(doc, "Error", (await raw.get("/v1/conversations", params={"limit": 0})).json())


# ---------------------------------------------------------------- fuzzing


def _seed(url: str) -> dict[str, str]:
    """A conversation with items and a stored response on it: real ids for the fuzz hooks."""
    with httpx.Client(base_url=url, timeout=30) as http:
        conv = http.post("/v1/conversations", json={"metadata": {"k": "v"}, "items": [
            {"role": "user", "content": "first"}, {"role": "assistant", "content": "second"}]}).json()
        items = http.get(f"/v1/conversations/{conv['id']}/items", params={"order": "asc"}).json()
        resp = http.post("/v1/responses", json={"model": MODEL, "conversation": conv["id"], "input": "hi"}).json()
        assert resp["status"] == "completed", resp
        prompt = http.post("/v1/prompts", json={"instructions": "Be {{tone}}."}).json()
    return {"conversation_id": conv["id"], "conversation": conv["id"], "item_id": items["data"][0]["id"],
            "response_id": resp["id"], "previous_response_id": resp["id"], "prompt_id": prompt["id"]}


def _fuzz(server, spec: str, base_url: str, tmp_path: Path, phases: str) -> dict:
    """One schemathesis run; fails with its report and the server's log on any server error."""
    ids = _seed(server.url)
    phases = os.environ.get("BRANCHWISE_FUZZ_PHASES", phases)
    report = tmp_path / "report.json"
    cmd = [str(SCHEMATHESIS), "run", spec, "--url", base_url, "--checks", "not_a_server_error",
           "--phases", phases, "--max-examples", str(MAX_EXAMPLES),
           "--generation-deterministic", "--workers", "1", "--request-timeout", "30", "--no-color",
           "--warnings", "off", "--report", "json", "--report-json-path", str(report)]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(ROOT / "tests" / "fuzz_hooks.py"),
           "BRANCHWISE_FUZZ_IDS": json.dumps(ids)}
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    found = json.loads(report.read_text()) if report.exists() else {}
    cases = found.get("test_cases", {})
    print(f"\nschemathesis {spec} [{phases}]: {found.get('running_time', 0):.1f} s, "
          f"{found.get('operations', {}).get('tested')} operations, {cases.get('generated')} requests, "
          f"{cases.get('with_failures')} with failures, {len(found.get('errors', []))} errors")
    assert run.returncode == 0 and found.get("complete") and not found["failures"] and not found["errors"], (
        f"schemathesis found server errors (exit {run.returncode}):\n{run.stdout[-20000:]}\n{run.stderr[-3000:]}"
        f"\n--- server log ---\n{server.output()[-20000:]}")
    assert found["operations"]["tested"] == found["operations"]["selected"] > 0
    return found


def _env(db_url: str, mock) -> dict[str, str]:
    return {"BRANCHWISE_DATABASE_URL": db_url, "BRANCHWISE_UPSTREAM_BASE_URL": mock.url}


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_fuzz_own_spec(serve, mock, db_url, tmp_path):
    """Every route, from the document the server serves. On SQLite every phase: the coverage
    phase sends each schema's boundary and invalid values; on PostgreSQL the random phases."""
    server = serve(_env(db_url, mock))
    phases = "coverage,fuzzing,stateful" if db_url.startswith("sqlite") else "fuzzing,stateful"
    _fuzz(server, f"{server.url}/openapi.json", server.url, tmp_path, phases)


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_fuzz_openai_spec(serve, mock, tmp_path):
    """OpenAI's spec, the operations branchwise serves (all of the file's), on SQLite. Its
    coverage phase (some 36,000 requests) is left out for time; the server's own spec has it."""
    spec = json.loads(require_shared(OPENAI_SPEC).read_text())
    served = {(method, path) for method, path, _ in ROUTES}
    spec["paths"] = {path: {method: op for method, op in ops.items()
                            if (method.upper(), "/v1" + path) in served or method not in _METHODS}
                     for path, ops in spec["paths"].items()}
    assert sum(1 for ops in spec["paths"].values() for method in ops if method in _METHODS) >= 15
    (tmp_path / "openai.json").write_text(json.dumps(spec))
    server = serve(_env(f"sqlite:///{tmp_path / 'branchwise.db'}", mock))
    _fuzz(server, str(tmp_path / "openai.json"), server.url + "/v1", tmp_path, "examples,fuzzing,stateful")


_METHODS = {"get", "post", "put", "patch", "delete", "head", "options", "trace"}


# ---------------------------------------------------------------- what the fuzzing found


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/conversations", {"items": [{"type": [None, None], "id": ""}]}, "items[0].type"),
    ("/v1/responses", {"model": MODEL, "input": [{"role": "user", "content": [{"type": {}}]}]},
     "input[0].content[0].type"),
    ("/v1/responses/input_tokens", {"text": {"format": {"type": {}, "name": "x", "schema": {}}}},
     "text.format.type"),
    ("/v1/responses/compact", {"model": MODEL, "input": [{"type": True}]}, "input[0].type"),
])
async def test_a_type_that_is_not_a_string_is_a_400(raw, path, body, param):
    """The tagged unions' discriminators took `type` for a string; a list, an object or a
    boolean there was a TypeError, a 500."""
    r = await raw.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["code"] == "invalid_value"


@pytest.mark.parametrize("after", ["2147483648", "-99999999999", str(2**64)])
async def test_starting_after_beyond_the_event_log_is_a_400(raw, after):
    """Past 32 bits the event log's query failed (PostgreSQL's int4; SQLite past 64 bits) once
    the stream had begun: a broken stream after a 200."""
    r = await raw.post("/v1/responses", json={"model": MODEL, "input": "hi", "background": True})
    r = await raw.get(f"/v1/responses/{r.json()['id']}", params={"stream": "true", "starting_after": after})
    assert r.status_code == 400 and r.json()["error"]["param"] == "starting_after", r.text


async def test_a_nul_in_after_is_a_400(raw):
    """PostgreSQL refuses a NUL in a text parameter: a 500 on every paged list."""
    conv = (await raw.post("/v1/conversations", json={})).json()["id"]
    for path in (f"/v1/conversations/{conv}/items", f"/v1/conversations/{conv}/tree"):
        r = await raw.get(path, params={"after": "msg_\x00"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "after", r.text
