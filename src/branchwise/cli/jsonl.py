"""branchwise's own file format for a whole conversation tree (`branchwise export --format jsonl`,
`branchwise import jsonl`): JSON Lines, one line for the conversation, then one per item.

    {"object": "branchwise.conversation", "version": 1, "id": "conv_...", "created_at": 1700000000,
     "metadata": {...}, "forked_from": null, "head": 3, "items": 4}
    {"n": 0, "parent": null, "created_at": 1700000000, "response_id": null, "item": {...}, "chat": {...}}
    {"n": 1, "parent": 0, ...}

Items come in the order they were stored, each after its parent; `parent` and `head` are
positions in the file (`n`), not node ids, which stay inside a database. `item` is the item as
the API shows it, `chat` as a model sees it (null for what a model never sees): both are stored
back as they are, so a conversation leaves and comes back byte for byte. Several conversations
may follow each other in one file. An import keeps the conversation's and the items' ids and
skips a conversation whose id is taken (a re-import adds nothing); the items go into a tree of
their own (docs/decisions/0057-cli-export-formats-and-chat.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError

from branchwise.core.ids import new_id
from branchwise.core.tree import Conversation, ImportedConversation, NewItem
from branchwise.wire import models as m
from branchwise.wire.ids import id_problem

OBJECT = "branchwise.conversation"
VERSION = 1
_ITEMS = TypeAdapter(m.InputItem)
_KNOWN_TYPES = ("message", "function_call", "function_call_output", "reasoning")
_CHAT_ROLES = ("system", "user", "assistant", "tool")


class FormatError(Exception):
    """What is wrong with a JSONL file, in one line."""


# ------------------------------------------------------------------------------------- export


def export_lines(conv: Conversation, rows: Sequence[tuple]) -> Iterator[bytes]:
    """The lines (without newlines) of one conversation: `rows` are `Repository.tree_items`'s."""
    position = {row[0]: k for k, row in enumerate(rows)}
    forked = None
    if conv.forked_from_conversation is not None:
        forked = {"conversation_id": conv.forked_from_conversation, "item_id": conv.forked_from_item}
    yield orjson.dumps({
        "object": OBJECT, "version": VERSION, "id": conv.id, "created_at": conv.created_at,
        "metadata": orjson.loads(conv.metadata), "forked_from": forked,
        "head": position.get(conv.head), "items": len(rows),
    })
    for k, (_node, parent, _item_id, _type, _role, response_id, created_at, data, chat) in enumerate(rows):
        # the stored bytes spliced in as they are: orjson's JSON has no newline
        head = orjson.dumps({"n": k, "parent": position.get(parent), "created_at": created_at,
                             "response_id": response_id})
        yield head[:-1] + b',"item":' + bytes(data) + b',"chat":' + (bytes(chat) if chat is not None else b"null") + b"}"


# ------------------------------------------------------------------------------------- import


def read(path: Path) -> Iterator[ImportedConversation]:
    """The conversations of a JSONL file, one at a time; `FormatError` names the first line that
    is wrong."""
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    header: dict[str, Any] | None = None
    items: list[NewItem] = []
    parents: list[int | None] = []
    times: list[int] = []
    responses: list[str | None] = []
    line_no = 0
    with path.open("rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path.name}:{line_no}"
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                raise FormatError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise FormatError(f"{where}: not a JSON object")
            if "object" in obj:
                if header is not None:
                    yield _finish(header, items, parents, times, responses, where)
                header = _header(obj, where)
                items, parents, times, responses = [], [], [], []
                continue
            if header is None:
                raise FormatError(f"{where}: an item before any conversation line")
            item, parent, created, response_id = _item(obj, len(items), where)
            items.append(item)
            parents.append(parent)
            times.append(created)
            responses.append(response_id)
    if header is None:
        raise FormatError(f"{path.name}: no conversation in the file")
    yield _finish(header, items, parents, times, responses, f"{path.name}:{line_no}")


def _finish(header: dict, items: list[NewItem], parents: list[int | None], times: list[int],
            responses: list[str | None], where: str) -> ImportedConversation:
    if len(items) != header["items"]:
        raise FormatError(f"{where}: conversation {header['id']} should have {header['items']} items, "
                          f"the file has {len(items)}")
    head = header["head"]
    if head is not None and head >= len(items):
        raise FormatError(f"{where}: conversation {header['id']}: 'head' {head} names no item")
    forked = header["forked_from"]
    return ImportedConversation(
        conv_id=header["id"], tree=new_id("conv"), metadata=header["metadata"], created_at=header["created_at"],
        items=items, parents=parents, item_created=times, head=head, response_ids=responses,
        forked_from=(forked["conversation_id"], forked["item_id"]) if forked else None)


def _int(obj: dict, field: str, where: str, *, none: bool = False) -> int | None:
    value = obj.get(field)
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FormatError(f"{where}: '{field}' is not a whole number >= 0{' or null' if none else ''}")
    return value


def _header(obj: dict, where: str) -> dict[str, Any]:
    if obj.get("object") != OBJECT or obj.get("version") != VERSION:
        raise FormatError(f"{where}: not a branchwise conversation (object {OBJECT!r}, version {VERSION})")
    conv_id = obj.get("id")
    if not isinstance(conv_id, str) or id_problem(conv_id, "conversation"):
        raise FormatError(f"{where}: 'id' {conv_id!r} is not a conversation id")
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{where}: 'metadata' is not an object of strings")
    try:
        m.check_metadata(metadata)
    except ValueError as e:
        raise FormatError(f"{where}: 'metadata': {e}") from None
    forked = obj.get("forked_from")
    if forked is not None and not (isinstance(forked, dict) and isinstance(forked.get("conversation_id"), str)
                                   and isinstance(forked.get("item_id"), str | None)):
        raise FormatError(f"{where}: 'forked_from' is not null or {{conversation_id, item_id}}")
    return {"id": conv_id, "metadata": metadata, "forked_from": forked,
            "created_at": _int(obj, "created_at", where), "head": _int(obj, "head", where, none=True),
            "items": _int(obj, "items", where)}


def _item(obj: dict, n: int, where: str) -> tuple[NewItem, int | None, int, str | None]:
    if obj.get("n") != n:
        raise FormatError(f"{where}: 'n' should be {n}")
    parent = _int(obj, "parent", where, none=True)
    if parent is not None and parent >= n:
        raise FormatError(f"{where}: 'parent' {parent} does not come before the item")
    response_id = obj.get("response_id")
    if response_id is not None and (not isinstance(response_id, str) or id_problem(response_id, "response")):
        raise FormatError(f"{where}: 'response_id' {response_id!r} is not a response id")
    item = obj.get("item")
    if not isinstance(item, dict) or not isinstance(item.get("type"), str) or item["type"] == "item_reference":
        raise FormatError(f"{where}: 'item' is not a stored item")
    item_id = item.get("id")
    if not isinstance(item_id, str) or id_problem(item_id, "item"):
        raise FormatError(f"{where}: 'item.id' {item_id!r} is not an item id")
    if item["type"] in _KNOWN_TYPES:
        try:
            _ITEMS.validate_python(item)
        except ValidationError as e:
            err = e.errors()[0]
            path = ".".join(str(p) for p in err["loc"] if not str(p).startswith("~"))
            raise FormatError(f"{where}: 'item.{path}': {err['msg']}") from None
    chat = obj.get("chat")
    if chat is not None and not (isinstance(chat, dict) and chat.get("role") in _CHAT_ROLES):
        raise FormatError(f"{where}: 'chat' is not null or a chat message")
    role, status = (v if isinstance(v, str) and len(v) <= 16 else None for v in (item.get("role"), item.get("status")))
    if len(item["type"]) > 32:
        raise FormatError(f"{where}: 'item.type' is longer than 32 characters")
    new = NewItem(item_id=item_id, type=item["type"], role=role, status=status, wire=item, data=orjson.dumps(item), chat=None if chat is None else orjson.dumps(chat))
    return new, parent, _int(obj, "created_at", where), response_id
