"""Hostile input, tried on every route of `api.app.ROUTES`, on SQLite and on PostgreSQL: each
gets an OpenAI-shaped 4xx (never a 500), is refused before any work (no row stored, the model
never called), and the limits (`Settings.max_*`) hold. A route added to the table must be
described in `PATH_KINDS` and `BODY_ROUTES` / `NO_BODY_ROUTES` below, or these tests fail."""

from __future__ import annotations

import re
from typing import Any

import pytest

from branchwise.api.app import ROUTES
from branchwise.settings import Settings

from .helpers import check_error, serving
from .test_bad_input import Untouched

MODEL = "mock"
LIMITS = {"max_body_bytes": 64 << 10, "max_input_items": 50, "max_text_chars": 1000, "max_json_depth": 16}

# every path parameter, by name: the kind of id it takes
PATH_KINDS = {"response_id": "resp", "conversation_id": "conv", "item_id": "msg", "prompt_id": "pmpt"}
# routes whose body is parsed, and a valid body for each (path parameters filled in by `_fill`)
BODY_ROUTES = {
    ("POST", "/v1/responses"): {"model": MODEL, "input": "x"},
    ("POST", "/v1/responses/input_tokens"): {"model": MODEL, "input": "x"},
    ("POST", "/v1/responses/compact"): {"model": MODEL, "input": "x"},
    ("POST", "/v1/conversations"): {"items": [{"role": "user", "content": "x"}]},
    ("POST", "/v1/conversations/{conversation_id}"): {"metadata": {"k": "v"}},
    ("POST", "/v1/conversations/{conversation_id}/items"): {"items": [{"role": "user", "content": "x"}]},
    ("POST", "/v1/conversations/{conversation_id}/fork"): {"metadata": {"k": "v"}},
    ("POST", "/v1/conversations/{conversation_id}/head"): {"item_id": "{item_id}"},
    ("POST", "/v1/prompts"): {"instructions": "x"},
    ("POST", "/v1/prompts/{prompt_id}"): {"instructions": "x"},
}
NO_BODY_ROUTES = {(m, p) for m, p, _ in ROUTES if (m, p) not in BODY_ROUTES}


def _bad_ids(prefix: str) -> list[tuple[str, str]]:
    return [
        ("wrong-prefix", "abc"),
        ("other-kind", "xyz_" + "0" * 48 if prefix != "resp" else "conv_" + "0" * 48),
        ("nul", f"{prefix}_{'0' * 20}\x00{'0' * 20}"),
        ("nul-only", "\x00"),
        ("over-long", f"{prefix}_" + "0" * 200),
        ("space", f"{prefix}_ab cd"),
        ("unicode", f"{prefix}_é"),
    ]


def test_every_route_is_described():
    for method, path, _ in ROUTES:
        for name in re.findall(r"{(\w+)}", path):
            assert name in PATH_KINDS, f"{method} {path}: add the id kind of {{{name}}} to PATH_KINDS"
    assert {(m, p) for m, p, _ in ROUTES} == set(BODY_ROUTES) | NO_BODY_ROUTES
    assert set(BODY_ROUTES) <= {(m, p) for m, p, _ in ROUTES}, "BODY_ROUTES names a route that is gone"


@pytest.fixture
async def hostile(db_url, mock):
    settings = Settings(database_url=db_url, upstream_base_url=mock.url, **LIMITS)
    async with serving(settings) as (_, client, raw):
        conv = await client.conversations.create(items=[{"role": "user", "content": "a"}])
        item = (await client.conversations.items.list(conv.id)).data[0].id
        resp = await client.responses.create(model=MODEL, input="b")
        prompt = (await raw.post("/v1/prompts", json={"instructions": "c"})).json()["id"]
        yield raw, {"conversation_id": conv.id, "item_id": item, "response_id": resp.id, "prompt_id": prompt}


def _fill(path: str, ids: dict[str, str]) -> str:
    return re.sub(r"{(\w+)}", lambda mo: ids[mo.group(1)], path)


def _body(method: str, path: str, ids: dict[str, str]) -> dict[str, Any]:
    body = dict(BODY_ROUTES[(method, path)])
    return {k: (ids[v[1:-1]] if isinstance(v, str) and v.startswith("{") else v) for k, v in body.items()}


async def _send(raw, method: str, url: str, **kw):
    r = await raw.request(method, url, **kw)
    assert r.status_code < 500, f"{method} {url}: {r.status_code} {r.text[:300]}"
    return r


async def test_malformed_path_ids_are_400(hostile, db_engine, mock):
    raw, ids = hostile
    for method, path, _ in ROUTES:
        for name in re.findall(r"{(\w+)}", path):
            for case, bad in _bad_ids(PATH_KINDS[name]):
                url = _fill(path, {**ids, name: bad.replace("\x00", "%00").replace(" ", "%20")})
                body = _body(method, path, ids) if (method, path) in BODY_ROUTES else None
                async with Untouched(db_engine, mock, f"{method} {path} {case}"):
                    r = await _send(raw, method, url, json=body)
                    err = check_error(r, 400, name, "invalid_value", case=f"{method} {path} {name} {case}")
                    assert err["message"].startswith(f"Invalid '{name}': "), err


async def test_well_formed_unknown_ids_are_404(hostile, db_engine, mock):
    raw, ids = hostile
    for method, path, _ in ROUTES:
        for name in re.findall(r"{(\w+)}", path):
            unknown = f"{PATH_KINDS[name]}_{'0' * 48}"
            url = _fill(path, {**ids, name: unknown})
            body = _body(method, path, ids) if (method, path) in BODY_ROUTES else None
            async with Untouched(db_engine, mock, f"{method} {path}"):
                r = await _send(raw, method, url, json=body)
                check_error(r, 404, case=f"{method} {path} {name}")


def _nested(depth: int) -> Any:
    v: Any = 1
    for _ in range(depth - 1):
        v = [v]
    return v


GENERIC_BODIES = [
    # (case, raw bytes or a function of the valid body, status, code)
    ("too-large", lambda b: {**b, "pad": "x" * (65 << 10)}, 413, "request_too_large"),
    ("not-json", b"{nope", 400, "invalid_json"),
    ("not-an-object", b"[1, 2]", 400, "invalid_json"),
    ("nested-300", lambda b: {**b, "pad": _nested(300)}, 400, None),
    ("nested-past-limit", lambda b: {**b, "pad": _nested(20)}, 400, "invalid_value"),
    ("long-string-key", lambda b: {**b, "k" * 1001: 1}, 400, "string_above_max_length"),
    ("lone-surrogate", b'{"model": "mock", "input": "\\ud800"}', 400, None),
]


async def test_hostile_bodies_on_every_body_route(hostile, db_engine, mock):
    raw, ids = hostile
    for (method, path), _ in BODY_ROUTES.items():
        url, valid = _fill(path, ids), _body(method, path, ids)
        for case, make, status, code in GENERIC_BODIES:
            content = make if isinstance(make, bytes) else None
            body = None if content is not None else make(valid)
            async with Untouched(db_engine, mock, f"{path} {case}"):
                r = await _send(raw, method, url, content=content, json=body,
                                headers={"content-type": "application/json"})
                check_error(r, status, code=code, case=f"{method} {path} {case}")
                if status == 413:
                    assert r.headers["connection"] == "close"


async def test_body_over_limit_without_content_length(hostile, db_engine, mock):
    raw, _ = hostile

    async def chunks():
        for _ in range(100):
            yield b" " * (4 << 10)
    async with Untouched(db_engine, mock):
        r = await _send(raw, "POST", "/v1/responses", content=chunks(),
                        headers={"content-type": "application/json"})
        check_error(r, 413, None, "request_too_large")


def req(**fields) -> dict[str, Any]:
    return {"model": MODEL, "input": "x", **fields}


MSG = {"role": "user", "content": "x"}
BAD_RESPONSE_BODIES = [
    # items and text past the limits
    ("51-items", req(input=[MSG] * 51), "input", "array_above_max_length"),
    ("long-input", req(input="x" * 1001), "input", "string_above_max_length"),
    ("long-part", req(input=[{"role": "user", "content": [{"type": "input_text", "text": "x" * 1001}]}]),
     "input[0].content[0].text", "string_above_max_length"),
    ("long-instructions", req(instructions="x" * 1001), "instructions", "string_above_max_length"),
    ("deep-tool-parameters", req(tools=[{"type": "function", "name": "f", "parameters": _nested(20)}]),
     "tools[0].parameters" + "[0]" * 13, "invalid_value"),
    # types that are not strings
    ("item-type-int", req(input=[{"type": 1}]), "input[0].type", "invalid_value"),
    ("item-type-list", req(input=[{"type": []}]), "input[0].type", "invalid_value"),
    ("part-type-null", req(input=[{"role": "user", "content": [{"type": None, "text": "x"}]}]),
     "input[0].content[0].type", "invalid_value"),
    ("format-type-list", req(text={"format": {"type": []}}), "text.format.type", "invalid_value"),
    ("tool-type-int", req(tools=[{"type": 1}]), "tools[0].type", "invalid_value"),
    # lax types OpenAI refuses
    ("n-string", req(n="2"), "n", "invalid_value"),
    ("n-float", req(n=2.0), "n", "invalid_value"),
    ("stream-yes", req(stream="yes"), "stream", "invalid_value"),
    ("stream-1", req(stream=1), "stream", "invalid_value"),
    ("store-string", req(store="false"), "store", "invalid_value"),
    ("background-int", req(background=0), "background", "invalid_value"),
    ("temperature-string", req(temperature="1"), "temperature", "invalid_value"),
    ("max-output-tokens-string", req(max_output_tokens="100"), "max_output_tokens", "invalid_value"),
    ("parallel-tool-calls-string", req(parallel_tool_calls="true"), "parallel_tool_calls", "invalid_value"),
    # malformed ids in the body
    ("conversation-nul", req(conversation="conv_\x00"), "conversation", "invalid_value"),
    ("conversation-abc", req(conversation="abc"), "conversation", "invalid_value"),
    ("conversation-ref-nul", req(conversation={"id": "\x00"}), "conversation.id", "invalid_value"),
    ("previous-response-nul", req(previous_response_id="resp_\x00"), "previous_response_id", "invalid_value"),
    ("previous-response-abc", req(previous_response_id="abc"), "previous_response_id", "invalid_value"),
    ("item-reference-nul", req(input=[{"type": "item_reference", "id": "msg_\x00"}]), "input[0].id",
     "invalid_value"),
    ("item-reference-long", req(input=[{"type": "item_reference", "id": "msg_" + "0" * 100}]), "input[0].id",
     "invalid_value"),
]


async def test_hostile_response_bodies(hostile, db_engine, mock):
    raw, _ = hostile
    for route in ("/v1/responses", "/v1/responses/input_tokens", "/v1/responses/compact"):
        for case, body, param, code in BAD_RESPONSE_BODIES:
            if route != "/v1/responses" and set(body) - {"model", "input", "instructions", "tools", "text",
                                                        "conversation", "previous_response_id"}:
                continue  # a field that route does not take at all
            if route == "/v1/responses/compact" and ("tools" in body or "text" in body):
                continue
            async with Untouched(db_engine, mock, f"{route} {case}"):
                r = await _send(raw, "POST", route, json=body)
                check_error(r, 400, param, code, case=f"{route} {case}")


async def test_hostile_conversation_bodies(hostile, db_engine, mock):
    raw, ids = hostile
    conv = ids["conversation_id"]
    cases = [
        ("POST", "/v1/conversations", {"items": [{"type": 1}]}, "items[0].type", "invalid_value"),
        ("POST", "/v1/conversations", {"items": [MSG] * 51}, "items", "array_above_max_length"),
        ("POST", "/v1/conversations", {"items": [{"role": "user", "content": [{"type": None}]}]},
         "items[0].content[0].type", "invalid_value"),
        ("POST", "/v1/conversations", {"items": [{"type": "item_reference", "id": "msg_\x00"}]}, "items[0].id",
         "invalid_value"),
        ("POST", f"/v1/conversations/{conv}/items", {"items": [{"type": "item_reference", "id": "abc"}]},
         "items[0].id", "invalid_value"),
        ("POST", f"/v1/conversations/{conv}/items", {"items": [MSG], "concurrency": 1}, "concurrency",
         "invalid_value"),
        ("POST", f"/v1/conversations/{conv}/fork", {"item_id": "msg_\x00"}, "item_id", "invalid_value"),
        ("POST", f"/v1/conversations/{conv}/fork", {"item_id": "resp_" + "0" * 48}, "item_id", "invalid_value"),
        ("POST", f"/v1/conversations/{conv}/head", {"item_id": "\x00"}, "item_id", "invalid_value"),
        ("POST", f"/v1/conversations/{conv}/head", {"item_id": 5}, "item_id", "invalid_value"),
        ("POST", f"/v1/conversations/{conv}", {"metadata": {"k": "v" * 1001}}, None, "string_above_max_length"),
        ("POST", f"/v1/conversations/{conv}", {"metadata": {"k\x00": "v"}}, "metadata", "invalid_value"),
        ("POST", f"/v1/conversations/{conv}", {"metadata": {"k": "\x00"}}, "metadata", "invalid_value"),
        ("POST", "/v1/conversations", {"metadata": {"k": "a\x00b"}}, "metadata", "invalid_value"),
    ]
    for method, url, body, param, code in cases:
        async with Untouched(db_engine, mock, f"{url} {body!r:.60}"):
            r = await _send(raw, method, url, json=body)
            err = check_error(r, 400, code=code, case=f"{url} {body!r:.80}")
            if param is not None:
                assert err["param"] == param, err


async def test_hostile_query_parameters(hostile, db_engine, mock):
    raw, ids = hostile
    conv, resp = ids["conversation_id"], ids["response_id"]
    cases = [
        (f"/v1/conversations/{conv}/items", {"after": "msg_\x00"}, "after"),
        (f"/v1/conversations/{conv}/items", {"after": "abc"}, "after"),
        (f"/v1/conversations/{conv}/tree", {"after": "\x00"}, "after"),
        (f"/v1/responses/{resp}/input_items", {"after": "msg_" + "0" * 100}, "after"),
        (f"/v1/responses/{resp}", {"stream": "true", "starting_after": str(2**63)}, "starting_after"),
        (f"/v1/responses/{resp}", {"stream": "true", "starting_after": "-5"}, "starting_after"),
        (f"/v1/responses/{resp}", {"stream": "true", "starting_after": "x"}, "starting_after"),
        (f"/v1/responses/{resp}", {"stream": "yes"}, "stream"),
        (f"/v1/conversations/{conv}/items", {"limit": str(2**70)}, "limit"),
    ]
    for url, params, param in cases:
        async with Untouched(db_engine, mock, f"{url} {params}"):
            r = await _send(raw, "GET", url, params=params)
            check_error(r, 400, param, "invalid_value", case=f"{url} {params}")


async def test_limits_themselves_are_accepted(hostile):
    raw, ids = hostile
    r = await raw.post("/v1/responses", json=req(input=[MSG] * 50, instructions="x" * 1000,
                                                 tools=[{"type": "function", "name": "f",
                                                         "parameters": {"a": _nested(13)}}]))
    assert r.status_code == 200, r.text
    r = await raw.post("/v1/responses", json=req(input="x" * 1000, n=2, stream=False, store=True))
    assert r.status_code == 200, r.text
    body = req(input="x" * 100)
    body["pad"] = None  # (an unknown parameter: refused after the size check, which it passes)
    r = await raw.post("/v1/responses", json=body)
    check_error(r, 400, "pad", "unknown_parameter")


async def test_default_body_limit(raw, db_engine, mock):
    """The defaults: a body past 16 MiB is refused from its Content-Length, before it is read."""
    big = b'{"model": "mock", "input": "' + b"x" * (16 << 20) + b'"}'
    async with Untouched(db_engine, mock):
        r = await _send(raw, "POST", "/v1/responses", content=big, headers={"content-type": "application/json"})
        check_error(r, 413, None, "request_too_large")


async def test_big_bodies_answer_as_small_ones(db_url, db_engine, mock):
    """Bodies past `OFF_LOOP_BYTES` take the chunked parser (`decode_big`): the same answers as
    the small bodies above, an `input` over the item limit refused before the rest is built."""
    from branchwise.api.common import OFF_LOOP_BYTES

    settings = Settings(database_url=db_url, upstream_base_url=mock.url, max_input_items=50, max_json_depth=16)
    pad = "p" * (OFF_LOOP_BYTES // 40)
    async with serving(settings) as (_, client, raw):
        big_ok = req(input=[{"role": "user", "content": pad}] * 50)
        r = await raw.post("/v1/responses", json=big_ok)
        assert r.status_code == 200, r.text[:300]
        assert r.json()["status"] == "completed"
        stored = await client.responses.input_items.list(r.json()["id"], limit=100)
        assert len(stored.data) == 50 and stored.data[0].content[0].text == pad
        cases = [
            ("too-many-items", req(input=[MSG] * (OFF_LOOP_BYTES // 20)), "input", "array_above_max_length"),
            ("too-many-conversation-items", {"items": [MSG] * (OFF_LOOP_BYTES // 20)}, "items",
             "array_above_max_length"),
            ("too-deep", req(input=[{"role": "user", "content": pad}] * 40,
                             tools=[{"type": "function", "name": "f", "parameters": _nested(20)}]),
             "tools[0].parameters" + "[0]" * 13, "invalid_value"),
            ("n-string", req(input=[{"role": "user", "content": pad}] * 40, n="2"), "n", "invalid_value"),
        ]
        for case, body, param, code in cases:
            url = "/v1/conversations" if "items" in body else "/v1/responses"
            async with Untouched(db_engine, mock, case):
                r = await _send(raw, "POST", url, json=body)
                check_error(r, 400, param, code, case=case)
        import orjson
        truncated = orjson.dumps(big_ok)[:-2]
        async with Untouched(db_engine, mock, "truncated"):
            r = await _send(raw, "POST", "/v1/responses", content=truncated,
                            headers={"content-type": "application/json"})
            check_error(r, 400, None, "invalid_json", case="truncated")
