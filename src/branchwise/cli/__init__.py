"""The `branchwise` command: one module per command group, registered here."""

from __future__ import annotations

import typer

from branchwise.cli import keys
from branchwise.cli.serve import serve

app = typer.Typer(help="branchwise: OpenAI Responses + Conversations, where a conversation is a tree.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """branchwise: OpenAI Responses + Conversations, where a conversation is a tree."""


app.command()(serve)
app.add_typer(keys.app, name="keys")


if __name__ == "__main__":
    app()
