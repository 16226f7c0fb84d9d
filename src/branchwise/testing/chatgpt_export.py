"""ChatGPT data exports made up for tests and benchmarks (`branchwise import chatgpt`): the
shape of a real export's conversations.json, with as many conversations, messages and
regenerated answers as asked."""

from __future__ import annotations

import json
import uuid
import zipfile
from pathlib import Path
from typing import Any


def message_node(key: str, role: str, text: str, parent: str | None, created: float | None,
                 recipient: str = "all", name: str | None = None) -> dict[str, Any]:
    return {
        "id": key,
        "message": {
            "id": key, "author": {"role": role, "name": name, "metadata": {}},
            "create_time": created, "update_time": None,
            "content": {"content_type": "text", "parts": [text]},
            "status": "finished_successfully", "end_turn": role == "assistant", "weight": 1.0,
            "metadata": {}, "recipient": recipient,
        },
        "parent": parent, "children": [],
    }


def conversation(number: int, messages: int, *, regenerated_every: int = 0, start: float = 1.7e9,
                 words: int = 12) -> dict[str, Any]:
    """Conversation `number`: a hidden root, then `messages` turns of user and assistant; every
    `regenerated_every`-th answer was regenerated once (a second assistant child of its user
    message, the one the conversation went on from)."""
    cid = str(uuid.UUID(int=number))
    created = start + number * 1000
    root = f"{cid}-root"
    mapping: dict[str, Any] = {root: {"id": root, "message": None, "parent": None, "children": []}}
    parent, t = root, created
    filler = " ".join(f"word{k}" for k in range(words))
    for k in range(messages):
        role = "user" if k % 2 == 0 else "assistant"
        t += 10
        key = f"{cid}-{k}"
        if role == "assistant" and regenerated_every and (k // 2) % regenerated_every == 0:
            old = f"{key}-first"
            mapping[old] = message_node(old, role, f"first answer {k} of {number}: {filler}", parent, t)
            mapping[parent]["children"].append(old)
        mapping[key] = message_node(key, role, f"{role} {k} of conversation {number}: {filler}", parent, t)
        mapping[parent]["children"].append(key)
        parent = key
    return {"title": f"Conversation {number}", "create_time": created, "update_time": t, "mapping": mapping,
            "moderation_results": [], "current_node": parent, "plugin_ids": None, "conversation_id": cid,
            "conversation_template_id": None, "gizmo_id": None, "is_archived": False, "safe_urls": [], "id": cid}


def export(count: int, messages: int = 10, regenerated_every: int = 3, words: int = 12) -> list[dict[str, Any]]:
    return [conversation(k, messages, regenerated_every=regenerated_every, words=words) for k in range(count)]


def write(path: Path, conversations: list[dict[str, Any]], *, zipped: bool = False) -> Path:
    """conversations.json at `path`, or (zipped) an export .zip holding it beside the other files
    an export has."""
    data = json.dumps(conversations)
    if not zipped:
        path.write_text(data)
        return path
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("user.json", json.dumps({"id": "user-x"}))
        z.writestr("conversations.json", data)
        z.writestr("chat.html", "<html></html>")
    return path
