"""`branchwise import chatgpt`: a ChatGPT data export becomes conversations whose trees mirror the
export's, read back through the API; re-importing adds nothing; a malformed file is refused
whole with one line naming what is wrong. On both databases."""

from __future__ import annotations

import json
import threading
import zipfile
from pathlib import Path

import openai
import orjson
import pytest

from branchwise.testing import chatgpt_export

from .cli_helpers import acli, cli, counts, listed, stored_counts
from .helpers import MODEL

FIXTURE = Path(__file__).parent / "data" / "chatgpt_conversations.json"
PARIS, SINE, EMPTY = (f"6f0a9a38-{k}-4c1e-9d0e-00000000000{n}" for k, n in (("1111", 1), ("2222", 2), ("3333", 3)))


def _text(item) -> str:
    d = item if isinstance(item, dict) else item.model_dump()
    if d["type"] == "message":
        return "".join(p.get("text", "") for p in d["content"])
    if d["type"] == "function_call_output":
        return d["output"]
    if d["type"] == "reasoning":
        return "".join(p["text"] for p in d["summary"])
    return f"{d['name']}:{d['arguments']}"


async def _by_chatgpt_id(client, result) -> dict[str, object]:
    out = {}
    for conv_id, _state, _ in listed(result):
        conv = await client.conversations.retrieve(conv_id)
        out[conv.metadata["chatgpt_id"]] = conv
    return out


async def _path(client, conv_id: str) -> list:
    return [it async for it in client.conversations.items.list(conv_id, order="asc", limit=100)]


async def _tree(client, conv_id: str) -> dict:
    return await client.get(f"/conversations/{conv_id}/tree", cast_to=object, options={"params": {"limit": 1000}})


async def test_an_export_becomes_conversations_that_mirror_its_trees(client, db_url, mock):
    result = await acli(db_url, "import", "chatgpt", str(FIXTURE), "--list")
    assert result.exit_code == 0, result.output
    assert [state for _, state, _ in listed(result)] == ["new"] * 3
    assert "imported 3 conversations" in result.stdout
    convs = await _by_chatgpt_id(client, result)

    # regenerated answers and an edited question: branches; the head where ChatGPT was left
    paris = convs[PARIS]
    assert paris.metadata == {"chatgpt_id": PARIS, "title": "Paris in a day"}
    # the listing finds imported conversations by their metadata, as it finds those made by the API
    page = await client.get("/conversations", cast_to=object,
                            options={"params": {"metadata[chatgpt_id]": PARIS}})
    assert [c["id"] for c in page["data"]] == [paris.id]
    assert paris.created_at == 1700000000
    path = await _path(client, paris.id)
    assert [(it.role, _text(it)) for it in path] == [
        ("user", "Plan a day in Paris.\nKeep it short."),
        ("assistant", "Start at the Eiffel Tower, then Montmartre."),
        ("user", "[image] And in the evening, near this place?"),
        ("assistant", "Dinner in the Marais, then the Seine by night."),
    ]
    assert paris.model_extra["head"] == path[-1].id
    tree = await _tree(client, paris.id)
    rows = {r["id"]: r for r in tree["data"]}
    assert len(rows) == 7  # the empty root and the hidden system message are skipped
    by_parent: dict = {}
    for r in tree["data"]:
        by_parent.setdefault(r["parent_id"], []).append(r["id"])
    assert by_parent[None] == [path[0].id]
    assert len(by_parent[path[0].id]) == 2 and by_parent[path[0].id][1] == path[1].id  # the two answers, in order
    assert len(by_parent[path[1].id]) == 2 and by_parent[path[1].id][0] == path[2].id  # question and its edit
    assert [rows[it.id]["created_at"] for it in path] == [1700000010, 1700000030, 1700000100, 1700000110]
    # the other answer, through the API: move the head to it
    first_answer = by_parent[path[0].id][0]
    await client.post(f"/conversations/{paris.id}/head", body={"item_id": first_answer}, cast_to=object)
    assert [_text(it) for it in await _path(client, paris.id)][-1] == \
        "Morning: the Louvre. Afternoon: a walk along the Seine."

    # tools: a call and its output, the model's thoughts as reasoning, a file notice as a developer message
    sine = convs[SINE]
    items = await _path(client, sine.id)
    assert [(it.type, getattr(it, "role", None)) for it in items] == [
        ("message", "user"), ("message", "developer"), ("reasoning", None), ("reasoning", None),
        ("function_call", None), ("function_call_output", None), ("message", "assistant")]
    assert _text(items[1]) == "[myfiles_browser] All the files uploaded by the user have been fully loaded."
    call, output = items[4], items[5]
    assert call.name == "python" and json.loads(call.arguments)["input"].startswith("import numpy as np")
    assert output.call_id == call.call_id and output.output == "[<matplotlib.lines.Line2D at 0x7f>]"
    # ... and the conversation goes on: the model sees the imported history as Chat Completions messages
    reply = await client.responses.create(model=MODEL, conversation=sine.id, input="Thanks!")
    assert reply.status == "completed"
    sent = mock.requests[-1]["messages"]
    assert [(m["role"], bool(m.get("tool_calls"))) for m in sent] == [
        ("user", False), ("system", False), ("assistant", True), ("tool", False), ("assistant", False),
        ("user", False)]
    assert sent[3]["tool_call_id"] == call.call_id

    # empty nodes skipped, their children re-hung; the head on the nearest kept ancestor
    empty = convs[EMPTY]
    assert empty.metadata == {"chatgpt_id": EMPTY}  # (no title)
    items = await _path(client, empty.id)
    assert [_text(it) for it in items] == ["Hello?"]
    tree = await _tree(client, empty.id)
    assert [(r["parent_id"], r["role"], r["created_at"]) for r in tree["data"]] == [
        (None, "user", 1700200001), (items[0].id, "assistant", 1700200001)]


async def test_reimporting_adds_nothing(db_engine, db_url, tmp_path):
    first = await acli(db_url, "import", "chatgpt", str(FIXTURE), "--list")
    assert first.exit_code == 0, first.output
    before = await counts(db_engine)
    assert before == (3, 16)
    again = await acli(db_url, "import", "chatgpt", str(FIXTURE), "--list")
    assert again.exit_code == 0, again.output
    assert [(c, s) for c, s, _ in listed(again)] == [(c, "already imported") for c, _, _ in listed(first)]
    assert "imported 0 conversations" in again.stdout and "3 imported before, skipped" in again.stdout
    # the same export as a .zip, with one conversation more: only that one is new
    export = json.loads(FIXTURE.read_text()) + chatgpt_export.export(1, messages=4, regenerated_every=0)
    zipped = chatgpt_export.write(tmp_path / "export.zip", export, zipped=True)
    third = await acli(db_url, "import", "chatgpt", str(zipped), "--list")
    assert third.exit_code == 0, third.output
    assert [s for _, s, _ in listed(third)] == ["already imported"] * 3 + ["new"]
    assert await counts(db_engine) == (4, 16 + 4)


async def test_a_big_export_with_a_progress_bar(client, db_engine, db_url, tmp_path):
    count, messages = 600, 8
    export = chatgpt_export.export(count, messages=messages, regenerated_every=2)
    path = chatgpt_export.write(tmp_path / "conversations.json", export)
    result = await acli(db_url, "import", "chatgpt", str(path))
    assert result.exit_code == 0, result.output
    assert f"{count}/{count}" in result.stderr  # the progress bar's last state
    assert f"imported {count} conversations" in result.stdout
    regenerated = sum(1 for n in export for key in n["mapping"] if key.endswith("-first"))
    assert await counts(db_engine) == (count, count * messages + regenerated)
    # one of them, whole: its head is ChatGPT's current node, its first answer a branch
    again = await acli(db_url, "import", "chatgpt", str(path), "--list")
    assert "imported 0 conversations" in again.stdout
    conv = await client.conversations.retrieve(listed(again)[7][0])
    assert conv.metadata == {"chatgpt_id": export[7]["id"], "title": "Conversation 7"}
    path_items = await _path(client, conv.id)
    assert len(path_items) == messages and _text(path_items[-1]).startswith(f"assistant {messages - 1} ")
    assert len((await _tree(client, conv.id))["data"]) == messages + 2


def _conv(mapping: dict, **extra) -> dict:
    return {"id": "c-1", "title": "t", "create_time": 1.7e9, "mapping": mapping, "current_node": None, **extra}


def _msg(role: str = "user", text: str = "hi", parent: str | None = None, **extra) -> dict:
    return {"message": {"author": {"role": role}, "content": {"content_type": "text", "parts": [text]},
                        "create_time": 1.7e9, **extra}, "parent": parent, "children": []}


GOOD = [_conv({"a": _msg(), "b": _msg("assistant", "hello", "a")}, id="good-1"),
        _conv({"a": _msg()}, id="good-2")]
MALFORMED = {
    "not JSON": (b'[{"id": "x", "mapping": {', "not valid JSON"),
    "an object": (b'{"conversations": []}', "expected a JSON array of conversations"),
    "empty": (b"   ", "the file is empty"),
    "no mapping": ([{"id": "x"}], "'mapping' is missing"),
    "no id": ([{"mapping": {}}], "'id' is missing"),
    "lost parent": ([_conv({"a": _msg(parent="nowhere")})], "has parent 'nowhere', which is not a node"),
    "cycle": ([_conv({"a": _msg(parent="b"), "b": _msg(parent="a")})], "'mapping' has a cycle"),
    "unknown role": ([_conv({"a": _msg(role="robot")})], "'message.author.role' is 'robot'"),
    "unknown head": ([_conv({"a": _msg()}, current_node="zz")], "'current_node' 'zz' is not a node"),
    "bad time": ([_conv({"a": _msg(create_time="yesterday")})], "'message.create_time' is not a time"),
    "no content type": ([_conv({"a": {"message": {"author": {"role": "user"}, "content": {}}, "parent": None}})],
                        "'message.content.content_type' is missing"),
    "bad third of three": (GOOD + [_conv({"a": _msg(role="robot")}, id="bad-3")], "conversation 3 (id 'bad-3')"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_a_malformed_export_is_refused_whole(case, db_url, tmp_path):
    content, expected = MALFORMED[case]
    path = tmp_path / "conversations.json"
    path.write_bytes(content if isinstance(content, bytes) else orjson.dumps(content))
    result = cli(db_url, "import", "chatgpt", str(path))
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "nothing was imported" in lines[0]
    assert stored_counts(db_url) == (0, 0)


def test_files_that_are_no_export(db_url, tmp_path):
    missing = cli(db_url, "import", "chatgpt", str(tmp_path / "nope.json"))
    assert missing.exit_code == 1 and "no such file" in missing.stderr
    zipped = tmp_path / "other.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("user.json", "{}")
    result = cli(db_url, "import", "chatgpt", str(zipped))
    assert result.exit_code == 1 and "the zip holds no conversations.json" in result.stderr


@pytest.mark.e2e
def test_import_while_a_server_serves_the_same_database(serve, db_url, mock, tmp_path):
    """The import's writes take turns with the server's (SQLite's file lock, PostgreSQL's
    transactions): the server goes on answering while it runs, and serves what it stored."""
    server = serve({"BRANCHWISE_DATABASE_URL": db_url, "BRANCHWISE_UPSTREAM_BASE_URL": mock.url})
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    conv = client.conversations.create()
    path = chatgpt_export.write(tmp_path / "conversations.json", chatgpt_export.export(300, messages=6))
    answered, failures, stop = [], [], threading.Event()

    def talk() -> None:
        while not stop.is_set():
            try:
                answered.append(client.responses.create(model=MODEL, conversation=conv.id, input="and?").status)
            except Exception as e:  # noqa: BLE001 - any failure is the test's finding
                failures.append(repr(e))

    talker = threading.Thread(target=talk)
    talker.start()
    try:
        result = cli(db_url, "import", "chatgpt", str(path), "--list")
    finally:
        stop.set()
        talker.join(30)
    assert result.exit_code == 0, result.output
    assert not failures and answered and set(answered) == {"completed"}
    imported = listed(result)
    assert len(imported) == 300
    served = client.conversations.retrieve(imported[-1][0])
    assert served.metadata["title"] == "Conversation 299"
    reply = client.responses.create(model=MODEL, conversation=served.id, input="go on")
    assert reply.output_text.startswith("[7 messages] Echo: go on")
    assert len(client.conversations.items.list(conv.id, limit=100).data) == 2 * len(answered)

