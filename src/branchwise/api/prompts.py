"""/v1/prompts routes (a branchwise extension; see `services.prompts`): create a prompt, add a
version, read, list and delete. Each parses the request, calls the prompts service, replies."""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import Response

from branchwise.api.common import json_response, paging, parse_body
from branchwise.services.prompts import Prompts, parse_version
from branchwise.wire import models as m
from branchwise.wire.ids import check_id

_VERSION = re.compile(r"[1-9][0-9]{0,8}")


def _service(request: Request) -> Prompts:
    return request.app.state.responses.prompts


def _list(data: list[dict], has_more: bool, cursor: str = "id") -> Response:
    return json_response({"object": "list", "data": data, "first_id": data[0][cursor] if data else None,
                          "last_id": data[-1][cursor] if data else None, "has_more": has_more})


async def create_prompt(request: Request) -> Response:
    return json_response(await _service(request).create(await parse_body(request, m.CreatePrompt)))


async def list_prompts(request: Request) -> Response:
    limit, order, after = paging(request, kind="prompt")
    return _list(*await _service(request).page(limit=limit, order=order, after=after))


async def retrieve_prompt(request: Request, prompt_id: str) -> Response:
    check_id(prompt_id, "prompt", "prompt_id")
    version = parse_version(request.query_params.get("version"), "version")
    return json_response(await _service(request).get(prompt_id, version))


async def new_version(request: Request, prompt_id: str) -> Response:
    check_id(prompt_id, "prompt", "prompt_id")
    body = await parse_body(request, m.CreatePrompt)
    return json_response(await _service(request).new_version(prompt_id, body))


async def list_versions(request: Request, prompt_id: str) -> Response:
    check_id(prompt_id, "prompt", "prompt_id")
    limit, order, after = paging(request, cursor=_VERSION, kind=None)
    rows, has_more = await _service(request).versions(prompt_id, limit=limit, order=order,
                                                      after=None if after is None else int(after))
    return _list(rows, has_more, cursor="version")


async def delete_prompt(request: Request, prompt_id: str) -> Response:
    check_id(prompt_id, "prompt", "prompt_id")
    await _service(request).delete(prompt_id)
    return json_response({"id": prompt_id, "object": "prompt.deleted", "deleted": True})


ROUTES = [
    ("POST", "/v1/prompts", create_prompt),
    ("GET", "/v1/prompts", list_prompts),
    ("GET", "/v1/prompts/{prompt_id}", retrieve_prompt),
    ("POST", "/v1/prompts/{prompt_id}", new_version),
    ("DELETE", "/v1/prompts/{prompt_id}", delete_prompt),
    ("GET", "/v1/prompts/{prompt_id}/versions", list_versions),
]
