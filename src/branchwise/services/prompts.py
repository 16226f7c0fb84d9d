"""Stored prompts (a branchwise extension; docs/decisions/0041): `/v1/prompts` keeps versioned
templates, and POST /v1/responses's `prompt` ({id, version, variables}, OpenAI's parameter)
names one.

A prompt version is `instructions` and/or `input` messages whose text may hold variables,
`{{name}}` (letters, digits and `_`; spaces inside the braces allowed). Its variables are the
names its text holds, found when the version is written. A response that names the prompt must
give every one of them a value and no other: a string or an `input_text` part is put in place
of the placeholder wherever it stands; an `input_image` or `input_file` part replaces it inside
a user, system or developer message's content, splitting the text around it (instructions and
assistant messages take text only).

The rendered prompt is what the model sees first, like `instructions`, on this request only: its
instructions (then the request's own `instructions`, in the same system message), then its
messages, then the history and the input. Nothing of it is stored as conversation items, and a
follow-up does not inherit it.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from pydantic import ValidationError

from branchwise.core.errors import InvalidRequest, NotFound, not_found
from branchwise.core.ids import new_id
from branchwise.store.repository import Repository
from branchwise.wire import items as witems
from branchwise.wire import models as m
from branchwise.wire.errors import from_validation

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_]+)\s*\}\}")
TEXT_PARTS = ("input_text", "output_text")
MAX_VERSION = 2**31 - 1


def _texts(data: dict[str, Any]) -> list[str]:
    """Every text of a version that may hold variables."""
    out = [data["instructions"]] if data.get("instructions") else []
    for msg in data.get("input") or []:
        content = msg["content"]
        if isinstance(content, str):
            out.append(content)
        else:
            out += [p["text"] for p in content if p.get("type") in TEXT_PARTS]
    return out


def prompt_object(prompt_id: str, version: int, created_at: int, data: str | dict[str, Any]) -> dict[str, Any]:
    d = orjson.loads(data) if isinstance(data, str) else data
    return {"id": prompt_id, "object": "prompt", "version": str(version), "created_at": created_at,
            "instructions": d.get("instructions"), "input": d.get("input"), "variables": d.get("variables", []),
            "metadata": d.get("metadata") or {}}


def _document(body: m.CreatePrompt) -> dict[str, Any]:
    """A version's stored JSON, its variables found."""
    if not body.instructions and not body.input:
        raise InvalidRequest("A prompt needs 'instructions' or 'input' (or both).", param="instructions",
                             code="missing_required_parameter")
    data: dict[str, Any] = {
        "instructions": body.instructions,
        "input": None if not body.input else [msg.model_dump(exclude_none=True) for msg in body.input],
        "metadata": body.metadata or {},
    }
    names: dict[str, None] = {}
    for text in _texts(data):
        names.update(dict.fromkeys(PLACEHOLDER.findall(text)))
    data["variables"] = list(names)
    return data


def parse_version(raw: str | None, param: str) -> int | None:
    if raw is None:
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_VERSION:
        raise InvalidRequest(f"Invalid value for '{param}': expected a version number from 1 to {MAX_VERSION}.",
                             param=param, code="invalid_value")
    return int(raw)


class Prompts:
    def __init__(self, store: Repository):
        self.store = store.prompts

    # ------------------------------------------------------------------ the /v1/prompts API

    async def create(self, body: m.CreatePrompt) -> dict[str, Any]:
        data = _document(body)
        prompt_id = new_id("pmpt")
        version, created, _ = await self.store.create(prompt_id, orjson.dumps(data).decode())
        return prompt_object(prompt_id, version, created, data)

    async def new_version(self, prompt_id: str, body: m.CreatePrompt) -> dict[str, Any]:
        data = _document(body)
        added = await self.store.add_version(prompt_id, orjson.dumps(data).decode())
        if added is None:
            raise not_found("Prompt", prompt_id)
        return prompt_object(prompt_id, added[0], added[1], data)

    async def get(self, prompt_id: str, version: int | None = None) -> dict[str, Any]:
        return prompt_object(prompt_id, *await self._version(prompt_id, version))

    async def _version(self, prompt_id: str, version: int | None, param: str | None = None) -> tuple:
        found = await self.store.get(prompt_id, version)
        if found is not None:
            return found
        if version is None or not await self.store.exists(prompt_id):
            raise NotFound(f"Prompt with id '{prompt_id}' not found.", param=param and f"{param}.id")
        raise NotFound(f"Prompt '{prompt_id}' has no version '{version}'.", param=param and f"{param}.version")

    async def page(self, *, limit: int, order: str, after: str | None) -> tuple[list[dict], bool]:
        rows, has_more = await self.store.page(limit=limit, order=order, after=after)
        return [prompt_object(*r) for r in rows], has_more

    async def versions(self, prompt_id: str, *, limit: int, order: str,
                       after: int | None) -> tuple[list[dict], bool]:
        rows, has_more = await self.store.versions(prompt_id, limit=limit, order=order, after=after)
        if not rows and not await self.store.exists(prompt_id):
            raise not_found("Prompt", prompt_id)
        return [prompt_object(prompt_id, *r) for r in rows], has_more

    async def delete(self, prompt_id: str) -> None:
        if not await self.store.delete(prompt_id):
            raise not_found("Prompt", prompt_id)

    # ------------------------------------------------------------------ POST /v1/responses

    async def prefix(self, req: m.CreateResponse) -> list[bytes]:
        """The Chat Completions messages `req.prompt` puts before the history (with the
        request's own `instructions`); sets `req.prompt.version` to the version used."""
        p = req.prompt
        version, _, data = await self._version(p.id, parse_version(p.version, "prompt.version"), "prompt")
        p.version = str(version)
        d = orjson.loads(data)
        values = _values(p, d["variables"], version)
        out: list[bytes] = []
        instructions = "\n\n".join(t for t in (_render_text(d.get("instructions"), values), req.instructions) if t)
        if instructions:
            out.append(witems.instructions_message(instructions))
        for msg in d.get("input") or []:
            content = _render_content(msg["content"], values, allow_media=msg["role"] != "assistant")
            try:
                item = m.Message.model_validate({"role": msg["role"], "content": content})
            except ValidationError as e:  # (a stored message is valid; its substitutions are parts)
                raise from_validation(e) from None
            chat = witems.from_input(item).chat
            if chat is not None:
                out.append(chat)
        return out


def _values(p: m.PromptParam, declared: list[str], version: int) -> dict[str, Any]:
    """The variables' values by name: every declared one given, no other."""
    given = p.variables or {}
    for name in given:
        if name not in declared:
            known = ", ".join(f"'{n}'" for n in declared) or "none"
            raise InvalidRequest(f"Unknown prompt variable '{name}': version {version} of prompt '{p.id}' has "
                                 f"these variables: {known}.", param=f"prompt.variables.{name}",
                                 code="invalid_value")
    missing = [n for n in declared if n not in given]
    if missing:
        raise InvalidRequest(f"Missing prompt variables: {', '.join(repr(n) for n in missing)} (version {version} "
                             f"of prompt '{p.id}').", param="prompt.variables", code="missing_required_parameter")
    return {name: v if isinstance(v, str) else (v.text if isinstance(v, m.InputText) else v)
            for name, v in given.items()}


def _media_refused(name: str) -> InvalidRequest:
    return InvalidRequest(f"The prompt variable '{name}' is an image or a file: it can only stand in the content "
                          "of a user, system or developer message, not in instructions or an assistant message.",
                          param=f"prompt.variables.{name}", code="invalid_value")


def _render_text(text: str | None, values: dict[str, Any]) -> str | None:
    if not text:
        return text

    def one(match: re.Match) -> str:
        value = values[match.group(1)]
        if not isinstance(value, str):
            raise _media_refused(match.group(1))
        return value
    return PLACEHOLDER.sub(one, text)


def _render_content(content: str | list[dict[str, Any]], values: dict[str, Any],
                    allow_media: bool) -> str | list[dict[str, Any]]:
    """A message's content with its variables in place: text in the text, an image or a file
    as a part of its own where it stood."""
    if isinstance(content, str):
        if not any(not isinstance(values[n], str) for n in PLACEHOLDER.findall(content)):
            return _render_text(content, values)
        content = [{"type": "input_text", "text": content}]
    out: list[dict[str, Any]] = []
    for part in content:
        if part.get("type") not in TEXT_PARTS:
            out.append(part)
            continue
        text, start = part["text"], 0
        for match in PLACEHOLDER.finditer(text):
            value = values[match.group(1)]
            if isinstance(value, str):
                continue
            if not allow_media:
                raise _media_refused(match.group(1))
            before = _render_text(text[start:match.start()], values)
            if before:
                out.append({**part, "text": before})
            out.append(value.model_dump(exclude_none=True))
            start = match.end()
        rest = _render_text(text[start:], values)
        if rest or start == 0:
            out.append({**part, "text": rest})
    return out
