"""ChatGPT's data export as branchwise conversations (`branchwise import chatgpt`).

The export's `conversations.json` (alone, or inside the export's .zip) is a JSON array of
conversations, each a tree: `mapping` names every node (`{id, message, parent, children}`),
`current_node` the node the user was on, `create_time` / `update_time` are Unix seconds. A node's
`message` has `author.role` (user, assistant, system, tool), `content.content_type` and, for
text, `content.parts`; an assistant message addressed to a tool has that tool as `recipient`.

How each node becomes an item (docs/decisions/0056-importing-chatgpt-exports.md):
- user and system messages: messages of that role; assistant messages: assistant messages;
- an assistant message addressed to a tool (`recipient` not `all`): a `function_call` of that
  tool, its text the `input` argument; a tool message right under such a call: its
  `function_call_output`; a tool message that answers no call (files loaded, a second result):
  a `developer` message naming the tool;
- thoughts and reasoning recaps: `reasoning` items (what a model never sees again);
- text parts are kept; other parts (images, audio, files) become short placeholders (`[image]`);
- nodes with no message, no text, or hidden from the conversation in ChatGPT are skipped, their
  children re-hung on the nearest ancestor kept.

Items are made by `wire.items.from_input`, exactly as the API stores the same input items. The
file is read as a stream (ijson), one conversation at a time, so its size is not held in memory.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import ijson
import orjson

from branchwise.core.ids import new_id, now
from branchwise.core.tree import ImportedConversation
from branchwise.wire import models as m
from branchwise.wire.items import from_input

KEY = "chatgpt_id"
"""The metadata entry that names the ChatGPT conversation: an import skips those stored before."""
MAX_METADATA_VALUE = 512
ROLES = ("user", "assistant", "system", "tool")
_TOOL_NAME = re.compile(r"[^A-Za-z0-9_-]")
_PLACEHOLDERS = {"image_asset_pointer": "[image]", "audio_asset_pointer": "[audio]",
                 "real_time_user_audio_video_asset_pointer": "[audio/video]", "video_container_asset_pointer": "[video]"}


Spec = tuple[type, dict[str, Any]]
"""An input item to make: its model (`wire.models`) and its fields."""


class ExportError(Exception):
    """What is wrong with an export file, in one line."""


# ---------------------------------------------------------------------------------- the file


class Source:
    """An export's conversations.json, opened as many times as needed (a check, then the import):
    the file itself, or its member in the export's .zip."""

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            raise ExportError(f"{path}: no such file")
        self.member: str | None = None
        self.name = path.name
        self.size = path.stat().st_size
        if zipfile.is_zipfile(path):
            try:
                with zipfile.ZipFile(path) as z:
                    found = [i for i in z.infolist() if Path(i.filename).name == "conversations.json"]
            except zipfile.BadZipFile as e:
                raise ExportError(f"{path}: not a readable zip ({e})") from None
            if not found:
                raise ExportError(f"{path}: the zip holds no conversations.json")
            found.sort(key=lambda i: i.filename.count("/"))
            self.member, self.size = found[0].filename, found[0].file_size
            self.name = f"{path.name}:{self.member}"

    @contextmanager
    def open(self) -> Iterator[IO[bytes]]:
        if self.member is None:
            with self.path.open("rb") as f:
                yield f
            return
        with zipfile.ZipFile(self.path) as z, z.open(self.member) as f:
            yield f

    def conversations(self, progress: Callable[[int], None] | None = None) -> Iterator[tuple[int, Any]]:
        """(position, the conversation as parsed JSON), one at a time; `progress` is told the
        bytes read so far."""
        with self.open() as f:
            start = b""
            while not start and (chunk := f.read(4096)):
                start = chunk.lstrip(b"\xef\xbb\xbf \t\r\n")
            if not start:
                raise ExportError(f"{self.name}: the file is empty")
            if not start.startswith(b"["):
                raise ExportError(f"{self.name}: expected a JSON array of conversations at the top level")
        with self.open() as f:
            stream = _Counting(f, progress) if progress else f
            try:
                yield from enumerate(ijson.items(stream, "item", use_float=True))
            except ijson.JSONError as e:
                raise ExportError(f"{self.name}: not valid JSON ({str(e).splitlines()[0]})") from None


class _Counting:
    """A binary stream that reports how many bytes were read from it."""

    def __init__(self, f: IO[bytes], report: Callable[[int], None]):
        self.f, self.report, self.done = f, report, 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.done += len(data)
        self.report(self.done)
        return data


# --------------------------------------------------------------------------- a conversation


def check(raw: Any, position: int) -> None:
    """`ExportError` naming what is wrong with one conversation of the export, if anything (all
    that `convert` checks, without making the items)."""
    _convert(raw, position, False)


def convert(raw: Any, position: int) -> ImportedConversation:
    """One conversation of the export as a branchwise conversation; `ExportError` names what is
    wrong with it."""
    out = _convert(raw, position, True)
    assert out is not None
    return out


def _convert(raw: Any, position: int, build: bool) -> ImportedConversation | None:
    where = f"conversation {position + 1}"
    if not isinstance(raw, dict):
        raise ExportError(f"{where}: not a JSON object")
    cid = raw.get("id") or raw.get("conversation_id")
    if not isinstance(cid, str) or not cid or len(cid) > MAX_METADATA_VALUE:
        raise ExportError(f"{where}: 'id' is missing or not a string of 1-{MAX_METADATA_VALUE} characters")
    where = f"conversation {position + 1} (id {cid!r})"
    title = raw.get("title")
    if title is not None and not isinstance(title, str):
        raise ExportError(f"{where}: 'title' is not a string")
    mapping = raw.get("mapping")
    if not isinstance(mapping, dict):
        raise ExportError(f"{where}: 'mapping' is missing or not an object")
    created = _time(raw.get("create_time"), f"{where}: 'create_time'")
    current = raw.get("current_node")
    if current is not None and (not isinstance(current, str) or current not in mapping):
        raise ExportError(f"{where}: 'current_node' {current!r} is not a node of 'mapping'")
    order = _walk(mapping, where)
    conv_created = int(created) if created is not None else None

    specs: list[Spec] = []
    parents: list[int | None] = []
    times: list[int] = []
    kept: dict[str, int | None] = {}  # node -> the position of its nearest kept item (itself or above)
    for key in order:
        node = mapping[key]
        above = kept.get(node.get("parent")) if node.get("parent") is not None else None
        spec, at = _item(key, node.get("message"), specs[above] if above is not None else None,
                         f"{where}: node {key!r}")
        if spec is None:
            kept[key] = above
            continue
        kept[key] = len(specs)
        specs.append(spec)
        parents.append(above)
        stamp = int(at) if at is not None else times[above] if above is not None else conv_created
        times.append(stamp if stamp is not None else now())
    if not build:
        return None
    if conv_created is None:
        conv_created = min(times) if times else now()
    if current is not None:
        head = kept[current]
    else:  # (exports always name one; else the newest item)
        head = max(range(len(specs)), key=lambda k: times[k]) if specs else None
    items = [from_input(model(**fields)) for model, fields in specs]
    metadata = {KEY: cid}
    if title:
        # (the API refuses NUL in metadata: PostgreSQL's text cannot hold it)
        metadata["title"] = title.replace("\x00", "")[:MAX_METADATA_VALUE]
    conv_id = new_id("conv")
    return ImportedConversation(conv_id=conv_id, tree=conv_id, metadata=metadata, created_at=conv_created,
                                items=items, parents=parents, item_created=times, head=head, key=(KEY, cid))


def _time(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e11:
        raise ExportError(f"{what} is not a time in Unix seconds")
    return value


def _walk(mapping: dict, where: str) -> list[str]:
    """The nodes in depth-first order from the roots, siblings in their parent's `children` order."""
    kids: dict[str, list[str]] = {}
    roots: list[str] = []
    for key, node in mapping.items():
        if not isinstance(node, dict):
            raise ExportError(f"{where}: node {key!r} of 'mapping' is not an object")
        parent = node.get("parent")
        if parent is None:
            roots.append(key)
        elif not isinstance(parent, str) or parent not in mapping:
            raise ExportError(f"{where}: node {key!r} has parent {parent!r}, which is not a node of 'mapping'")
        else:
            kids.setdefault(parent, []).append(key)
        children = node.get("children", [])
        if not isinstance(children, list):
            raise ExportError(f"{where}: node {key!r}: 'children' is not a list")
    order: list[str] = []
    stack = list(reversed(roots))
    while stack:
        key = stack.pop()
        order.append(key)
        mine = kids.get(key, [])
        if len(mine) > 1:
            listed = {c: i for i, c in enumerate(mapping[key].get("children", [])) if isinstance(c, str)}
            mine.sort(key=lambda c: listed.get(c, len(listed)))
        stack.extend(reversed(mine))
    if len(order) < len(mapping):
        lost = next(k for k in mapping if k not in set(order))
        raise ExportError(f"{where}: 'mapping' has a cycle: node {lost!r} never reaches a root")
    return order


def _item(key: str, message: Any, above: Spec | None, where: str) -> tuple[Spec | None, float | None]:
    """The input item a node's message becomes (None: skipped), and its creation time."""
    if message is None:
        return None, None
    if not isinstance(message, dict):
        raise ExportError(f"{where}: 'message' is not an object")
    author = message.get("author")
    role = author.get("role") if isinstance(author, dict) else None
    if role not in ROLES:
        raise ExportError(f"{where}: 'message.author.role' is {role!r}, not one of {', '.join(ROLES)}")
    content = message.get("content")
    if not isinstance(content, dict) or not isinstance(content.get("content_type"), str):
        raise ExportError(f"{where}: 'message.content.content_type' is missing")
    at = _time(message.get("create_time"), f"{where}: 'message.create_time'")
    meta = message.get("metadata")
    if isinstance(meta, dict) and meta.get("is_visually_hidden_from_conversation") is True:
        return None, at
    text, reasoning = _content(content, where)
    if not text.strip():
        return None, at
    if reasoning:
        return (m.Reasoning, {"type": "reasoning", "summary": [{"type": "summary_text", "text": text}]}), at
    recipient = message.get("recipient")
    if role == "assistant" and recipient not in (None, "all"):
        name = _TOOL_NAME.sub("_", str(recipient))[:64]
        arguments = orjson.dumps({"input": text}).decode()
        return (m.FunctionCall, {"type": "function_call", "call_id": f"call_{key}"[:64], "name": name,
                                 "arguments": arguments}), at
    if role == "tool":
        if above is not None and above[0] is m.FunctionCall:
            return (m.FunctionCallOutput, {"type": "function_call_output", "call_id": above[1]["call_id"],
                                           "output": text}), at
        name = author.get("name") or "tool"
        return (m.Message, {"role": "developer", "content": f"[{name}] {text}"}), at
    return (m.Message, {"role": role, "content": text}), at


def _content(content: dict, where: str) -> tuple[str, bool]:
    """A message's text (parts that are not text as placeholders), and whether it is the model's
    reasoning."""
    kind = content["content_type"]
    if kind in ("text", "multimodal_text"):
        parts = content.get("parts", [])
        if not isinstance(parts, list):
            raise ExportError(f"{where}: 'message.content.parts' is not a list")
        text, placed = "", False
        for part in parts:  # (a placeholder and the text after it share a line)
            t = _part(part)
            if t:
                joint = "" if not text else " " if placed or not isinstance(part, str) else "\n"
                text, placed = text + joint + t, not isinstance(part, str)
        return text, False
    if kind == "thoughts":
        thoughts = content.get("thoughts") or []
        texts = [t.get("content") or t.get("summary") for t in thoughts if isinstance(t, dict)]
        return "\n\n".join(t for t in texts if isinstance(t, str)), True
    if kind == "reasoning_recap":
        return _str(content.get("content")), True
    if kind == "tether_quote":
        return "\n".join(t for t in (_str(content.get("title")), _str(content.get("url")),
                                     _str(content.get("text"))) if t), False
    if kind == "user_editable_context":
        return "\n".join(t for t in (_str(content.get("user_profile")), _str(content.get("user_instructions")))
                         if t), False
    for field in ("text", "result"):
        if isinstance(content.get(field), str):
            return content[field], False
    return f"[{kind}]", False


def _part(part: Any) -> str:
    if isinstance(part, str):
        return part
    if isinstance(part, dict):
        if isinstance(part.get("text"), str):  # (an audio transcription, say)
            return part["text"]
        kind = part.get("content_type")
        return _PLACEHOLDERS.get(kind, f"[{kind}]" if isinstance(kind, str) else "[attachment]")
    return "" if part is None else str(part)


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""
