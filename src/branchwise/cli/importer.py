"""`branchwise import chatgpt PATH` and `branchwise import jsonl PATH`: conversations made
elsewhere, stored as the API would store them.

An import reads the file twice (docs/decisions/0056-importing-chatgpt-exports.md): the first
pass checks every conversation and writes nothing, so a malformed file is refused whole, with
one line naming what is wrong; the second writes them, a batch of whole conversations per
transaction. A conversation is stored whole or not at all, and one stored before (the same
ChatGPT conversation, the same branchwise id) is skipped: running an import again adds nothing,
and finishes one that stopped half-way (the database gone, Ctrl-C).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from branchwise.cli import chatgpt, jsonl
from branchwise.cli.database import PROJECT, CliError, repository, run
from branchwise.core.tree import ImportedConversation

app = typer.Typer(help="Import conversations into the database (BRANCHWISE_DATABASE_URL).", no_args_is_help=True)

BATCH_ITEMS = 2000
"""Items written in one transaction at most (fewer when one conversation has more): short
enough that a server writing to the same SQLite file waits for it only milliseconds."""
BATCH_CONVERSATIONS = 200

Reader = Callable[[Callable[[int], None] | None], Iterator[ImportedConversation | None]]
"""Reads a file's conversations; given a progress callback (the first pass), it may yield None
for each instead, having only checked it."""


def _chatgpt_reader(path: Path) -> tuple[Reader, int, str]:
    try:
        source = chatgpt.Source(path)
    except chatgpt.ExportError as e:
        raise CliError(str(e)) from None

    def read(progress: Callable[[int], None] | None) -> Iterator[ImportedConversation | None]:
        """(With `progress`, the check: None for each conversation, nothing made.)"""
        for position, raw in source.conversations(progress):
            if progress is None:
                yield chatgpt.convert(raw, position)
            else:
                chatgpt.check(raw, position)
                yield None

    return read, source.size, source.name


def _jsonl_reader(path: Path) -> tuple[Reader, int, str]:
    if not path.is_file():
        raise CliError(f"{path}: no such file")
    size = path.stat().st_size

    def read(progress: Callable[[int], None] | None) -> Iterator[ImportedConversation | None]:
        yield from jsonl.read(path)

    return read, size, path.name


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("·"),
                    TimeRemainingColumn(), console=console, transient=False)


_ERRORS = (chatgpt.ExportError, jsonl.FormatError)


async def _import(open_file: Callable[[], tuple[Reader, int, str]], listing: bool, project: str) -> None:
    read, size, name = open_file()
    err = Console(stderr=True)
    # 1. check everything, write nothing
    total = 0
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), console=err,
                  transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task(f"checking {name}", total=size or None)
        try:
            for _ in read(lambda done: bar.update(task, completed=done)):
                total += 1
        except _ERRORS as e:
            raise CliError(f"{e} (nothing was imported)") from None
    # 2. write, whole conversations per transaction
    new = old = 0
    async with repository(project=project) as repo:
        with _progress(err) as bar:
            task = bar.add_task(f"importing {name}", total=total)
            batch: list[ImportedConversation] = []
            items = 0

            async def flush() -> None:
                nonlocal new, old, items
                stored = await repo.import_conversations(batch)
                for conv, (conv_id, created) in zip(batch, stored, strict=True):
                    new, old = new + created, old + (not created)
                    if listing:
                        title = conv.metadata.get("title") or ""
                        typer.echo(f"{conv_id}\t{'new' if created else 'already imported'}\t{title}")
                bar.advance(task, len(batch))
                batch.clear()
                items = 0

            try:
                for conv in read(None):
                    assert conv is not None
                    if batch and (items + len(conv.items) > BATCH_ITEMS or len(batch) >= BATCH_CONVERSATIONS):
                        await flush()
                    batch.append(conv)
                    items += len(conv.items)
            except _ERRORS as e:  # (the file changed since it was checked)
                raise CliError(f"{e} ({new} conversations were imported before it)") from None
            if batch:
                await flush()
    typer.echo(f"imported {new} conversation{'s' * (new != 1)} from {name}"
               + (f" ({old} imported before, skipped)" if old else ""))


_LIST = typer.Option(False, "--list", "-l", help="Print each conversation: its id, whether it is new, its title.")


@app.command("chatgpt")
def import_chatgpt(
    path: Path = typer.Argument(..., help="The export's conversations.json, or the export .zip itself."),
    listing: bool = _LIST,
    project: str = PROJECT,
) -> None:
    """Import a ChatGPT data export: each conversation with every branch, its head where you left it."""
    run(_import(lambda: _chatgpt_reader(path), listing, project))


@app.command("jsonl")
def import_jsonl(
    path: Path = typer.Argument(..., help="A file written by `branchwise export --format jsonl`."),
    listing: bool = _LIST,
    project: str = PROJECT,
) -> None:
    """Import conversations exported with `branchwise export --format jsonl` (ids kept)."""
    run(_import(lambda: _jsonl_reader(path), listing, project))
