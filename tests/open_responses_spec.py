"""What branchwise sends on the Open Responses routes, checked against the Open Responses OpenAPI
document (`../shared/reference/open-responses/openapi.json`) with `jsonschema` (Draft 2020-12,
the dialect of OpenAPI 3.1, `$ref`s resolved in the document).

`Recorder` wraps an ASGI app and keeps every reply of a `/v1/responses` route; `problems` names
what in those replies the document does not allow. conftest.py wraps every in-process app of the
test session (through `httpx2.ASGITransport`) and fails a test whose replies have any, so every
object and event the suite produces is checked, not only those a test looks at.

Which schema checks what:

| reply | schema |
|---|---|
| a Response (`POST /v1/responses`, `GET /v1/responses/{id}`, `.../cancel`), and each of its `alternatives` (extension, `n` > 1) | `ResponseResource` |
| each Server-Sent Event (`POST` with `stream`, `GET` with `stream=true`) | the event's own schema, by `type`, from the `text/event-stream` union of `POST /responses` |
| `POST /v1/responses/compact` | `CompactResource` |
| an error (4xx, 5xx) | `{"error": ErrorPayload}` (the body the specification's Errors section shows) |

The routes the document has no schema for (`DELETE`, `input_items`, `input_tokens`) are not
checked, nor are branchwise's extension routes (conversations, tree). Extension fields are
fine: the document allows properties it does not name.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

DOCUMENT = "urn:open-responses:openapi"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"{DOCUMENT}#/components/schemas/{name}"}


# Where the document says what it cannot mean, and what is checked instead.
# `JsonSchemaResponseFormat.schema` admits only null (`anyOf: [{type: null}]`): the JSON Schema
# a client asked for, which its own request schema (`JsonSchemaResponseFormatParam.schema`, an
# object) takes and OpenAI echoes, could never be echoed. Checked as the request's: an object.
AMENDMENTS: dict[tuple[str, ...], Any] = {
    ("JsonSchemaResponseFormat", "properties", "schema"): {"anyOf": [{"type": "object"}, {"type": "null"}]},
}


def load(path: Path) -> Spec:
    return Spec(json.loads(path.read_text()))


class Spec:
    """The validators of the document's objects and events."""

    def __init__(self, document: dict[str, Any]):
        document = copy.deepcopy(document)
        schemas = document["components"]["schemas"]
        for (name, *keys), value in AMENDMENTS.items():
            node = schemas[name]
            for k in keys[:-1]:
                node = node[k]
            assert keys[-1] in node, f"amendment of {name}.{'.'.join(keys)}: no longer in the document"
            node[keys[-1]] = value
        union = document["paths"]["/responses"]["post"]["responses"]["200"]["content"]["text/event-stream"]
        events = [option["$ref"].rsplit("/", 1)[1] for option in union["schema"]["oneOf"]]
        registry = Registry().with_resource(DOCUMENT, Resource(contents=document, specification=DRAFT202012))

        def validator(schema: dict[str, Any]) -> Draft202012Validator:
            return Draft202012Validator(schema, registry=registry)

        self.response = validator(_ref("ResponseResource"))
        self.compaction = validator(_ref("CompactResource"))
        self.error = validator({"type": "object", "required": ["error"],
                                "properties": {"error": _ref("ErrorPayload")}})
        self.events: dict[str, Draft202012Validator] = {}
        for name in events:
            event = schemas[name]
            if "response" in event["properties"]:  # a lifecycle event: its Response checked apart
                event = {**event, "properties": {**event["properties"], "response": {"type": "object"}}}
                self.events[event["properties"]["type"]["enum"][0]] = validator(event)
            else:
                self.events[event["properties"]["type"]["enum"][0]] = validator(_ref(name))
        self._valid: set[bytes] = set()

    def response_problems(self, obj: Any, where: str) -> list[str]:
        # a stream's first two snapshots, and a Response read back, are the same bytes: checked once
        key = json.dumps(obj, sort_keys=True).encode()
        if key in self._valid:
            return []
        out = _problems(self.response, obj, where)
        if isinstance(obj, dict):  # branchwise extension (`n` > 1): the other alternatives, each a Response
            for k, alt in enumerate(obj.get("alternatives") or []):
                out += _problems(self.response, alt, f"{where}.alternatives[{k}]")
        if not out:
            if len(self._valid) > 4096:
                self._valid.clear()
            self._valid.add(key)
        return out

    def event_problems(self, event: Any, where: str) -> list[str]:
        kind = event.get("type") if isinstance(event, dict) else None
        if isinstance(kind, str) and ":" in kind:  # an implementor's own event: `slug:name`, allowed
            return []
        if kind not in self.events:
            return [f"{where}: event type {kind!r} is not an Open Responses event "
                    f"(known: {', '.join(sorted(self.events))})"]
        out = _problems(self.events[kind], event, f"{where} ({kind})")
        if isinstance(event.get("response"), dict):
            out += self.response_problems(event["response"], f"{where} ({kind}).response")
        return out


def _reason(e: Any) -> Any:
    """What is wrong, out of a oneOf/anyOf failure that names every branch: the branches whose
    `type` is not the value's are not the one meant; of the others' errors, the deepest."""
    while e.context:
        branches: dict[Any, list[Any]] = {}
        for c in e.context:
            branches.setdefault(c.schema_path[0], []).append(c)
        meant = [c for errs in branches.values()
                 if not any(c.validator in ("enum", "const") and list(c.relative_path) == ["type"] for c in errs)
                 for c in errs]
        e = max(meant or e.context, key=lambda c: len(c.absolute_path))
    return e


def _problems(validator: Draft202012Validator, obj: Any, where: str) -> list[str]:
    errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    out = []
    for e in errors:
        best = _reason(e)
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in best.absolute_path)
        value = json.dumps(best.instance)[:300]
        out.append(f"{where}{path}: {best.message[:300]} (value: {value})")
    return out


# ---------------------------------------------------------------- what the app sent

ROUTES = re.compile(r"^/v1/responses(?:/(?P<id>[^/]+)(?P<rest>/.*)?)?$")


@dataclass
class Reply:
    method: str
    path: str
    query: str
    status: int = 0
    content_type: str = ""
    chunks: list[bytes] = field(default_factory=list)
    done: bool = False

    def __str__(self) -> str:
        return f"{self.method} {self.path}{'?' + self.query if self.query else ''} -> {self.status}"


class Recorder:
    """Keeps what an ASGI app sends on the `/v1/responses` routes."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []

    def wrap(self, app: Any) -> Any:
        async def recorded(scope, receive, send):
            if scope["type"] != "http" or not ROUTES.match(scope["path"]):
                return await app(scope, receive, send)
            reply = Reply(scope["method"], scope["path"], scope.get("query_string", b"").decode("latin-1"))
            self.replies.append(reply)

            async def keep(message):
                if message["type"] == "http.response.start":
                    reply.status = message["status"]
                    headers = dict(message.get("headers") or [])
                    reply.content_type = headers.get(b"content-type", b"").decode("latin-1")
                elif message["type"] == "http.response.body":
                    reply.chunks.append(message.get("body", b""))
                    reply.done = not message.get("more_body", False)
                await send(message)

            await app(scope, receive, keep)

        recorded.__wrapped__ = app
        return recorded

    def take(self) -> list[Reply]:
        out, self.replies = self.replies, []
        return out


def reply_problems(spec: Spec, reply: Reply) -> list[str]:
    """What in one reply the document does not allow. A body cut short (a client that stopped
    reading a stream) is checked up to its last whole event."""
    m = ROUTES.match(reply.path)
    body = b"".join(reply.chunks)
    where = str(reply)
    if reply.content_type.startswith("text/event-stream"):
        if reply.status != 200:
            return [f"{where}: an event stream with status {reply.status}"]
        out = []
        for k, block in enumerate(body.split(b"\n\n")[:-1]):
            data = [line[6:] for line in block.split(b"\n") if line.startswith(b"data: ")]
            if not data:
                continue
            out += spec.event_problems(json.loads(b"\n".join(data)), f"{where} event {k}")
        return out
    if not reply.done or not reply.content_type.startswith("application/json"):
        return []
    obj = json.loads(body)
    if reply.status >= 400:
        return _problems(spec.error, obj, where)
    if reply.status != 200:
        return []
    ident, rest = m["id"], m["rest"]
    if reply.method == "POST" and ident == "compact" and rest is None:
        return _problems(spec.compaction, obj, where)
    if (reply.method == "POST" and ident is None) or (reply.method == "GET" and ident and rest is None) \
            or (reply.method == "POST" and ident and rest == "/cancel"):
        return spec.response_problems(obj, where)
    return []
