"""`branchwise tree CONVERSATION_ID`: a conversation's whole tree in the terminal, read from the
database: every branch, each item's first line, the head's path bright and the head marked."""

from __future__ import annotations

import orjson
import typer
from rich.console import Console

from branchwise.cli.database import PROJECT, CliError, repository, run
from branchwise.cli.render import Entry, item_text, rich_tree, title_of
from branchwise.core.tree import Conversation
from branchwise.store.repository import Repository
from branchwise.wire.ids import id_problem

PIPE_WIDTH = 200
"""Columns drawn when the output is not a terminal (a file, a pipe): lines are cut, not wrapped."""


async def load(repo: Repository, conv_id: str) -> tuple[Conversation, list[tuple], list[Entry]]:
    """A conversation, its tree's rows (`Repository.tree_items`) and their entries to draw."""
    if id_problem(conv_id, "conversation"):
        raise CliError(f"{conv_id!r} is not a conversation id (conv_...)")
    conv = await repo.conversation(conv_id)
    if conv is None:
        raise CliError(f"no conversation {conv_id} in this database")
    rows = await repo.tree_items(conv.tree)
    entries = [Entry(key=node, parent=parent, item_id=item_id, type=type_, role=role,
                     text=item_text(orjson.loads(data)), created_at=created_at)
               for node, parent, item_id, type_, role, _resp, created_at, data, _chat in rows]
    return conv, rows, entries


def console() -> Console:
    out = Console(highlight=False)
    if not out.is_terminal:
        out.width = PIPE_WIDTH
    return out


def tree(
    conversation_id: str = typer.Argument(..., help="The conversation (conv_...)."),
    ids: bool = typer.Option(False, "--ids", help="Show whole item ids (default: their last characters)."),
    project: str = PROJECT,
) -> None:
    """Show a conversation's whole tree: every branch, each item's first line, the head marked."""

    async def show() -> None:
        async with repository(project=project) as repo:
            conv, rows, entries = await load(repo, conversation_id)
        title = title_of(conv.id, orjson.loads(conv.metadata), conv.head_item, len(rows))
        out = console()
        out.print(rich_tree(title, entries, conv.head, full_ids=ids, width=out.width // 2))

    run(show())
