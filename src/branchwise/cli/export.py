"""`branchwise export CONVERSATION_ID --format jsonl|md`: a conversation's whole tree, every
branch, from the database. JSONL (`cli/jsonl.py`) comes back with `branchwise import jsonl`;
Markdown is for reading."""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path

import orjson
import typer

from branchwise.cli import jsonl
from branchwise.cli.database import PROJECT, repository, run
from branchwise.cli.render import markdown
from branchwise.cli.tree import load


class Format(StrEnum):
    jsonl = "jsonl"
    md = "md"


def export(
    conversation_id: str = typer.Argument(..., help="The conversation (conv_...)."),
    format: Format = typer.Option(Format.jsonl, "--format", "-f", help="jsonl (re-importable) or md (to read)."),
    output: Path = typer.Option(None, "--output", "-o", help="Write to this file (default: standard output)."),
    project: str = PROJECT,
) -> None:
    """Export a conversation's whole tree (every branch) as JSONL or Markdown."""

    async def read():
        async with repository(project=project) as repo:
            return await load(repo, conversation_id)

    conv, rows, entries = run(read())
    if format is Format.jsonl:
        chunks = (line + b"\n" for line in jsonl.export_lines(conv, rows))
    else:
        chunks = (s.encode() for s in markdown(conv.id, orjson.loads(conv.metadata), conv.created_at,
                                                conv.head_item, entries, conv.head))
    if output is None:
        out = sys.stdout.buffer
        try:
            for chunk in chunks:
                out.write(chunk)
            out.flush()
        except BrokenPipeError:  # (`| head`: the reader has what it wanted; nothing more to flush)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    with output.open("wb") as f:
        for chunk in chunks:
            f.write(chunk)
    typer.echo(f"wrote {conv.id} ({len(rows)} items) to {output}", err=True)
