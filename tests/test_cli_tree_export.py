"""`branchwise tree` and `branchwise export`: a conversation branched through the API, drawn
whole in the terminal, exported as Markdown and as JSONL, and the JSONL imported back byte for
byte. On both databases."""

from __future__ import annotations

import openai
import orjson
import pytest

from .cli_helpers import acli, cli, listed, stored_counts
from .helpers import MODEL


async def _branched(client) -> tuple[str, dict[str, str]]:
    """A conversation with every kind of branch: `n` alternatives, a sibling turn made by moving
    the head back, and a fork's turn in the same tree. Returns its id and the text of each of
    its items, by id."""
    conv = await client.conversations.create(metadata={"title": "Branches <b>"},
                                             items=[{"role": "user", "content": "Plan a day in Paris."}])
    first = await client.responses.create(model=MODEL, conversation=conv.id, input="Morning?")
    alts = await client.responses.create(model=MODEL, conversation=conv.id, input="Evening?", extra_body={"n": 2})
    other = alts.model_extra["alternatives"][0]  # (n - 1 others)
    await client.post(f"/conversations/{conv.id}/head", body={"item_id": first.output[-1].id}, cast_to=object)
    side = await client.responses.create(model=MODEL, conversation=conv.id, input="Lunch?\nsecond line")
    fork = await client.post(f"/conversations/{conv.id}/fork", body={}, cast_to=object)
    await client.responses.create(model=MODEL, conversation=fork["id"], input="Dinner in the fork?")
    texts = {}
    for cid in (conv.id, fork["id"]):
        tree = await client.get(f"/conversations/{cid}/tree", cast_to=object, options={"params": {"limit": 1000}})
        for row in tree["data"]:
            if row["response_id"]:
                r = await client.responses.retrieve(row["response_id"])
                for it in r.output:
                    texts[it.id] = it.content[0].text
                async for it in client.responses.input_items.list(row["response_id"]):
                    texts[it.id] = it.content[0].text
    texts[(await client.conversations.items.list(conv.id, order="asc")).data[0].id] = "Plan a day in Paris."
    assert other["output"][0]["id"] in texts and side.output[0].id in texts
    return conv.id, texts


async def test_tree_draws_every_branch_with_the_head_marked(client, db_url):
    conv_id, texts = await _branched(client)
    result = await acli(db_url, "tree", conv_id, "--ids")
    assert result.exit_code == 0, result.output
    out = result.stdout
    lines = out.splitlines()
    assert "Branches <b>" in lines[0] and conv_id in lines[0]
    drawn = {item_id: next(ln for ln in lines[1:] if item_id in ln) for item_id in texts}
    assert len(drawn) == len(texts) == 10  # the fork's turn too: it is the same tree
    for item_id, text in texts.items():
        assert text.splitlines()[0] in drawn[item_id]  # each item's first line
    assert "second line" not in out
    head = (await client.conversations.retrieve(conv_id)).model_extra["head"]
    marked = [ln for ln in lines if "◀ head" in ln]
    assert len(marked) == 1 and head in marked[0]
    # forks nest, runs do not: the root's line is the least indented, the alternatives' the most
    indent = {item_id: len(ln) - len(ln.lstrip(" │├└─")) for item_id, ln in drawn.items()}
    assert min(indent.values()) == indent[next(k for k, t in texts.items() if t == "Plan a day in Paris.")]
    assert len(set(indent.values())) >= 3

    short = await acli(db_url, "tree", conv_id)  # ids shortened to their ends
    body = short.stdout.split("\n", 1)[1]  # (the title names the head's whole id)
    assert all(item_id[-8:] in body and item_id not in body for item_id in texts)


async def test_export_markdown_holds_the_whole_tree(client, db_url):
    conv_id, texts = await _branched(client)
    result = await acli(db_url, "export", conv_id, "--format", "md")
    assert result.exit_code == 0, result.output
    md = result.stdout
    assert md.startswith("# Branches <b>\n")
    for item_id, text in texts.items():
        assert f"`{item_id}`" in md and text in md  # whole texts, every line
    assert "## Branch 1" in md and "(the head's path)" in md
    assert md.count("· **head**") == 1


async def test_export_jsonl_comes_back_byte_for_byte(client, db_url, tmp_path):
    conv_id, texts = await _branched(client)
    path = tmp_path / "conv.jsonl"
    result = await acli(db_url, "export", conv_id, "-o", str(path))
    assert result.exit_code == 0, result.output
    lines = path.read_bytes().splitlines()
    header = orjson.loads(lines[0])
    assert header["id"] == conv_id and header["items"] == len(lines) - 1 == 10
    assert {orjson.loads(ln)["item"]["id"] for ln in lines[1:]} == set(texts)
    before = await client.conversations.retrieve(conv_id)
    path_before = [it.id async for it in client.conversations.items.list(conv_id, order="asc")]

    again = await acli(db_url, "import", "jsonl", str(path), "--list")  # the conversation is there: nothing new
    assert again.exit_code == 0 and [s for _, s, _ in listed(again)] == ["already imported"]

    await client.conversations.delete(conv_id)
    back = await acli(db_url, "import", "jsonl", str(path), "--list")
    assert back.exit_code == 0, back.output
    assert listed(back) == [(conv_id, "new", "Branches <b>")]
    after = await client.conversations.retrieve(conv_id)
    assert (after.created_at, after.metadata, after.model_extra) == (before.created_at, before.metadata,
                                                                     before.model_extra)
    assert [it.id async for it in client.conversations.items.list(conv_id, order="asc")] == path_before
    second = tmp_path / "again.jsonl"
    assert (await acli(db_url, "export", conv_id, "-o", str(second))).exit_code == 0
    assert second.read_bytes() == path.read_bytes()
    # and it goes on, the model seeing the same history
    reply = await client.responses.create(model=MODEL, conversation=conv_id, input="Still there?")
    assert reply.output_text.startswith(f"[{len(path_before) + 1} messages] Echo: Still there?")


def _header(**changes) -> dict:
    return {"object": "branchwise.conversation", "version": 1, "id": "conv_abc", "created_at": 1, "metadata": {},
            "forked_from": None, "head": 0, "items": 1, **changes}


def _line(**changes) -> dict:
    item = {"id": "msg_1", "type": "message", "status": "completed", "role": "user",
            "content": [{"type": "input_text", "text": "hi"}]}
    return {"n": 0, "parent": None, "created_at": 1, "response_id": None, "item": item,
            "chat": {"role": "user", "content": "hi"}, **changes}


BAD_JSONL = {
    "not a branchwise file": ([{"object": "list"}], "not a branchwise conversation"),
    "bad id": ([_header(id="resp_1"), _line()], "'id' 'resp_1' is not a conversation id"),
    "items missing": ([_header(items=2), _line()], "should have 2 items, the file has 1"),
    "head beyond": ([_header(head=3), _line()], "'head' 3 names no item"),
    "parent after": ([_header(), _line(parent=0)], "'parent' 0 does not come before the item"),
    "item before any conversation": ([_line()], "an item before any conversation line"),
    "bad item": ([_header(), _line(item={"id": "msg_1", "type": "message", "role": "robot", "content": "x"})],
                 "'item.role'"),
    "bad chat": ([_header(), _line(chat={"role": "robot"})], "'chat' is not null or a chat message"),
    "bad metadata": ([_header(metadata={"k": 1}), _line()], "'metadata' is not an object of strings"),
    "second conversation bad": ([_header(), _line(), _header(id="conv_def", items=5), _line()],
                                "conversation conv_def should have 5 items"),
}


@pytest.mark.parametrize("case", BAD_JSONL, ids=list(BAD_JSONL))
def test_a_malformed_jsonl_is_refused_whole(case, db_url, tmp_path):
    lines, expected = BAD_JSONL[case]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(orjson.dumps(x) for x in lines) + b"\n")
    result = cli(db_url, "import", "jsonl", str(path))
    assert result.exit_code == 1, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr, result.stderr
    assert stored_counts(db_url) == (0, 0)


def test_unknown_or_malformed_conversations(db_url):
    for args, expected in ((("tree", "conv_nope"), "no conversation conv_nope"),
                           (("tree", "nope"), "'nope' is not a conversation id"),
                           (("export", "conv_nope", "--format", "md"), "no conversation conv_nope")):
        result = cli(db_url, *args)
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.startswith("error: ") and expected in result.stderr and result.stderr.count("\n") == 1


async def test_commands_act_for_their_project(client, db_url, mock, tmp_path):
    """`tree`, `export` and `import` act for `--project` (default `default`): an export of the
    default project's conversation imported into another is seen by that project's key alone."""
    from branchwise.app import create_app
    from branchwise.settings import Settings

    from .teams import make_key, sdk

    conv_id, _ = await _branched(client)
    assert (await acli(db_url, "tree", conv_id, "--project", "team-a")).exit_code == 1  # not team-a's
    path = tmp_path / "conv.jsonl"
    assert (await acli(db_url, "export", conv_id, "-o", str(path))).exit_code == 0
    await client.conversations.delete(conv_id)
    back = await acli(db_url, "import", "jsonl", str(path), "--project", "team-a", "--list")
    assert back.exit_code == 0 and listed(back) == [(conv_id, "new", "Branches <b>")], back.output
    assert (await acli(db_url, "tree", conv_id, "--project", "team-a")).exit_code == 0
    assert (await acli(db_url, "tree", conv_id)).exit_code == 1
    _, a = make_key(db_url, "team-a")
    _, b = make_key(db_url, "team-b")
    app = create_app(Settings(database_url=db_url, upstream_base_url=mock.url))
    async with app.router.lifespan_context(app):
        assert (await sdk(app, a).conversations.retrieve(conv_id)).id == conv_id
        with pytest.raises(openai.NotFoundError):
            await sdk(app, b).conversations.retrieve(conv_id)
