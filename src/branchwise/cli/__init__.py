"""The `branchwise` command: one module per command group, registered here."""

from __future__ import annotations

import typer

from branchwise.cli import importer
from branchwise.cli.chat import chat
from branchwise.cli.export import export
from branchwise.cli.serve import serve
from branchwise.cli.tree import tree

app = typer.Typer(help="branchwise: OpenAI Responses + Conversations, where a conversation is a tree.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """branchwise: OpenAI Responses + Conversations, where a conversation is a tree."""


app.command()(serve)
app.add_typer(importer.app, name="import")
app.command()(tree)
app.command()(export)
app.command()(chat)


if __name__ == "__main__":
    app()
