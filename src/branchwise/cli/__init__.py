"""The `branchwise` command: one module per command group, registered here."""

from __future__ import annotations

import typer

from branchwise.cli import importer, keys
from branchwise.cli.chat import chat
from branchwise.cli.export import export
from branchwise.cli.serve import serve
from branchwise.cli.tree import tree

app = typer.Typer(help="branchwise: OpenAI Responses + Conversations, where a conversation is a tree.",
                  no_args_is_help=True, add_completion=False)


def _version(value: bool) -> None:
    if value:
        import branchwise

        typer.echo(f"branchwise {branchwise.__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """branchwise: OpenAI Responses + Conversations, where a conversation is a tree."""


app.command()(serve)
app.add_typer(keys.app, name="keys")
app.add_typer(importer.app, name="import")
app.command()(tree)
app.command()(export)
app.command()(chat)


@app.command()
def settings() -> None:
    """Print every setting (variable, default, meaning) as a Markdown table."""
    from branchwise.settings import reference

    typer.echo(reference(), nl=False)


if __name__ == "__main__":
    app()
