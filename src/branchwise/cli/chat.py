"""`branchwise chat`: a REPL against a running branchwise server, through the official `openai`
SDK, that branches: answers stream as they come; `/regen [n]` asks again for n alternatives of
the last answer and lets you pick one (the head moves there, the others stay as branches);
`/branches`, `/switch`, `/fork` and `/tree` move around the tree. Everything it does is an API
call any client could make (docs/cli.md)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from branchwise.cli.render import Entry, Shape, first_line, item_text, rich_tree, short_id, title_of, who
from branchwise.cli.tree import console as wide_console

HELP = """\
Type a message to send it. Commands:
  /regen [n]     answer the last message again, n alternatives (1-8, default 1); pick one
  /branches      list the tree's branches (numbered, for /switch)
  /switch ITEM   move the head: a number from /branches, an item id, or the end of one
  /fork          a new conversation from here (the old one stays as it is)
  /tree          the whole tree, the head marked
  /help          this text
  /quit          leave (Ctrl-D too)"""
DEFAULT_MODEL = "gpt-4.1-mini"
MAX_N = 8
TEXT_FETCHES = 100
"""Responses whose items `/tree` and `/branches` fetch at most, to show their text."""


class Chat:
    """One REPL session: the client, the conversation it is in, and what it has learned of the
    items' texts (the tree API names items; their text comes from the path and the responses)."""

    def __init__(self, client: Any, model: str, conversation: str | None, console: Console,
                 ask: Callable[[str], str]):
        self.client, self.model, self.conv, self.out, self.ask = client, model, conversation, console, ask
        self.texts: dict[str, str] = {}
        self.branches: list[str] = []

    # ------------------------------------------------------------------ the loop

    def loop(self) -> None:
        import openai

        where = self.conv or "a new conversation (made by your first message)"
        self.out.print(f"[bold]branchwise chat[/bold] · model [bold]{escape(self.model)}[/bold] · {where}"
                       " · /help for commands")
        while True:
            try:
                line = self.ask("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                self.out.print()
                return
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not self.command(line):
                        return
                else:
                    self.send(line)
            except KeyboardInterrupt:
                self.out.print("\n[dim](stopped)[/dim]")
            except openai.AuthenticationError:
                self.out.print("[red]the server refused the API key (401): pass --api-key or set OPENAI_API_KEY[/red]")
            except openai.APIConnectionError as e:
                self.out.print(f"[red]cannot reach the server: {escape(str(e))}[/red]")
            except openai.APIStatusError as e:
                message = (e.body or {}).get("message") if isinstance(e.body, dict) else None
                self.out.print(f"[red]error {e.status_code}: {escape(message or str(e))}[/red]")

    def command(self, line: str) -> bool:
        """Run one /command; False to leave."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/quit", "/exit", "/q"):
            return False
        if name == "/help":
            self.out.print(HELP, markup=False)
        elif name == "/regen":
            n = int(arg) if arg.isdigit() else 1 if not arg else 0
            if not 1 <= n <= MAX_N:
                self.out.print(f"[red]/regen takes a number of alternatives, 1-{MAX_N}[/red]")
            else:
                self.regen(n)
        elif name == "/branches":
            self.show_branches()
        elif name == "/switch":
            self.switch(arg)
        elif name == "/fork":
            self.fork()
        elif name == "/tree":
            self.show_tree()
        else:
            self.out.print(f"[red]unknown command {escape(name)}[/red] · /help lists them")
        return True

    # ------------------------------------------------------------------ talking

    def send(self, text: str) -> None:
        if self.conv is None:
            conv = self.client.conversations.create(metadata={"title": first_line(text, 80)})
            self.conv = conv.id
            self.out.print(f"[dim]conversation {self.conv}[/dim]")
        stream = self.client.responses.create(model=self.model, conversation=self.conv, input=text, stream=True)
        self.stream(stream, 1)

    def stream(self, stream: Any, n: int) -> list[Any]:
        """Show a response stream (n alternatives side by side where the terminal allows): the
        finished Response of each alternative, in order."""
        texts = [""] * n
        done: list[Any] = [None] * n
        started = time.perf_counter()
        live = None
        if n > 1 and self.out.is_terminal:
            from rich.live import Live

            live = Live(self._columns(texts), console=self.out, refresh_per_second=10)
            live.start()
        try:
            for event in stream:
                alt = (event.model_extra or {}).get("alternative", 0) if n > 1 else 0
                if event.type == "response.output_text.delta":
                    texts[alt] += event.delta
                    if n == 1:
                        self.out.print(event.delta, end="", markup=False, highlight=False, soft_wrap=True)
                    elif live is not None:
                        live.update(self._columns(texts))
                elif event.type in ("response.completed", "response.incomplete", "response.failed"):
                    done[alt] = event.response
                elif event.type == "error":
                    self.out.print(f"\n[red]error: {escape(str(getattr(event, 'message', event)))}[/red]")
        finally:  # (Ctrl-C included: the connection is closed, the server finishes and stores the answer)
            stream.close()
            if live is not None:
                live.stop()
        seconds = time.perf_counter() - started
        if n == 1:
            self.out.print()
        elif live is None:
            for k, text in enumerate(texts, 1):
                self.out.print(f"[bold]── alternative {k} ──[/bold]")
                self.out.print(text, markup=False, highlight=False)
        for r in done:
            if r is not None:
                for it in r.output:
                    self.texts[it.id] = item_text(it.model_dump())
        self._footer(done, seconds)
        return done

    @staticmethod
    def _columns(texts: list[str]):
        from rich.columns import Columns
        from rich.panel import Panel
        from rich.text import Text

        return Columns([Panel(Text(t), title=str(k)) for k, t in enumerate(texts, 1)], equal=True, expand=True)

    def _footer(self, done: list[Any], seconds: float) -> None:
        parts = []
        for r in done:
            if r is None:
                continue
            usage = r.usage
            tokens = f"{usage.input_tokens} in / {usage.output_tokens} out tokens" if usage else "no usage"
            state = "" if r.status == "completed" else f" · {r.status}"
            parts.append(f"{r.model} · {tokens}{state}")
        self.out.print(f"[dim]{escape(' | '.join(parts) or 'no response')} · {seconds:.1f} s[/dim]")

    def regen(self, n: int) -> None:
        """The last user message answered again: n new answers hang under it beside the old
        one; the one picked becomes the head."""
        if self.conv is None:
            self.out.print("[red]nothing to regenerate yet[/red]")
            return
        base = next((it for it in self.client.conversations.items.list(self.conv, order="desc", limit=100)
                     if it.type == "message" and it.role == "user"), None)
        if base is None:
            self.out.print("[red]no message of yours on this branch to answer again[/red]")
            return
        self._move_head(base.id)
        stream = self.client.responses.create(model=self.model, conversation=self.conv, input=[], stream=True,
                                              extra_body={"n": n})
        done = self.stream(stream, n)
        pick = self._pick(n) if n > 1 else 1
        chosen = done[pick - 1]
        if chosen is None or not chosen.output:
            self.out.print("[red]that alternative has no output; the head stays on your message[/red]")
            return
        self._move_head(chosen.output[-1].id)
        if n > 1:
            self.out.print(f"[dim]head → alternative {pick}; the others stay as branches (/branches)[/dim]")

    def _pick(self, n: int) -> int:
        while True:
            try:
                answer = self.ask(f"pick 1-{n} [1]: ").strip()
            except EOFError:
                return 1
            if not answer:
                return 1
            if answer.isdigit() and 1 <= int(answer) <= n:
                return int(answer)
            self.out.print(f"[red]a number from 1 to {n}[/red]")

    # ------------------------------------------------------------------ the tree

    def _move_head(self, item_id: str) -> None:
        self.client.post(f"/conversations/{self.conv}/head", body={"item_id": item_id}, cast_to=object)

    def _tree(self) -> tuple[list[Entry], str | None]:
        rows: list[dict] = []
        head = None
        after = None
        while True:
            params: dict[str, Any] = {"limit": 1000}
            if after:
                params["after"] = after
            page = self.client.get(f"/conversations/{self.conv}/tree", cast_to=object, options={"params": params})
            rows += page["data"]
            head = page["head"]
            if not page["has_more"]:
                break
            after = page["last_id"]
        by_id = {r["id"]: r for r in rows}  # (a re-hung copy shares its item's id: the newest stands)
        self._learn_texts(list(by_id.values()))
        entries = [Entry(key=r["id"], parent=r["parent_id"], item_id=r["id"], type=r["type"], role=r["role"],
                         text=self.texts.get(r["id"]), created_at=r["created_at"]) for r in by_id.values()]
        return entries, head

    def _learn_texts(self, rows: list[dict]) -> None:
        """The texts of items not seen yet: those of the head's path, then those of the responses
        that made the others (their output and input items)."""
        if all(r["id"] in self.texts for r in rows):
            return
        for it in self.client.conversations.items.list(self.conv, order="asc", limit=100):
            self.texts[it.id] = item_text(it.model_dump())
        responses = list(dict.fromkeys(r["response_id"] for r in rows
                                       if r["id"] not in self.texts and r["response_id"]))
        for rid in responses[:TEXT_FETCHES]:
            r = self.client.responses.retrieve(rid)
            for it in r.output:
                self.texts[it.id] = item_text(it.model_dump())
            for it in self.client.responses.input_items.list(rid, limit=100):
                self.texts.setdefault(it.id, item_text(it.model_dump()))

    def _need_conversation(self) -> bool:
        if self.conv is None:
            self.out.print("[red]no conversation yet: send a message first[/red]")
            return False
        return True

    def show_tree(self) -> None:
        if not self._need_conversation():
            return
        entries, head = self._tree()
        self.out.print(rich_tree(title_of(self.conv, {}, head, len(entries)), entries, head))

    def show_branches(self) -> None:
        if not self._need_conversation():
            return
        entries, head = self._tree()
        shape = Shape(entries, head)
        self.branches = shape.leaves()
        for k, leaf in enumerate(self.branches, 1):
            e = shape.entries[leaf]
            depth, key = 0, leaf
            while key is not None and key in shape.entries:
                depth, key = depth + 1, shape.entries[key].parent
            mark = "  [bold reverse]◀ head[/bold reverse]" if leaf in shape.on_path else ""
            self.out.print(f"{k:>3}. {escape(f'[{who(e)}]')} {escape(first_line(e.text, 80))}  "
                           f"[dim]{short_id(e.item_id)} · {depth} items[/dim]{mark}")
        if not self.branches:
            self.out.print("[dim](no items yet)[/dim]")

    def switch(self, arg: str) -> None:
        if not self._need_conversation():
            return
        if not arg:
            self.out.print("[red]/switch takes a number from /branches or an item id[/red]")
            return
        if arg.isdigit():
            if not 1 <= int(arg) <= len(self.branches):
                self.out.print("[red]no such branch: /branches lists them[/red]")
                return
            target = self.branches[int(arg) - 1]
        else:
            entries, _ = self._tree()
            found = [e.item_id for e in entries if e.item_id == arg or e.item_id.endswith(arg.lstrip("…"))]
            if len(found) != 1:
                self.out.print(f"[red]{'no item' if not found else 'several items'} match {escape(arg)}[/red]")
                return
            target = found[0]
        self._move_head(target)
        self.out.print(f"[dim]head → {short_id(target)}[/dim] {escape(first_line(self.texts.get(target), 80))}")

    def fork(self) -> None:
        if not self._need_conversation():
            return
        new = self.client.post(f"/conversations/{self.conv}/fork", body={}, cast_to=object)
        self.out.print(f"[dim]forked {self.conv} → now in[/dim] {new['id']}")
        self.conv = new["id"]


def chat(
    base_url: str = typer.Option(None, "--base-url", help="The server's API, e.g. http://127.0.0.1:8000/v1 "
                                 "(default: OPENAI_BASE_URL, else BRANCHWISE_HOST and BRANCHWISE_PORT)."),
    api_key: str = typer.Option(None, "--api-key", help="Default: OPENAI_API_KEY, else BRANCHWISE_API_KEY."),
    conversation: str = typer.Option(None, "--conversation", "-c", help="Go on with this conversation."),
    model: str = typer.Option(None, "--model", "-m", help="Default: the first model the server lists."),
) -> None:
    """Chat with a running server, in a conversation you can branch (/help inside)."""
    import openai

    from branchwise.settings import Settings

    if base_url is None or api_key is None:
        settings = Settings()
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or f"http://{settings.host}:{settings.port}/v1"
        api_key = api_key or os.environ.get("OPENAI_API_KEY") or settings.api_key or "none"
    console = wide_console()
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=1)
    try:
        models = [m.id for m in client.models.list()]
        if conversation is not None:
            client.conversations.retrieve(conversation)
    except openai.AuthenticationError:
        _fail(console, f"{base_url} refused the API key (401): pass --api-key or set OPENAI_API_KEY")
    except openai.APIConnectionError:
        _fail(console, f"cannot reach a server at {base_url} (start one with `branchwise serve`, or pass --base-url)")
    except openai.APIStatusError as e:
        _fail(console, f"{base_url}: {e.status_code} {e.message}")
    if model is None:
        model = models[0] if models else DEFAULT_MODEL
    if console.is_terminal:
        import readline  # noqa: F401  (line editing and history for input())
    Chat(client, model, conversation, console, console.input).loop()


def _fail(console: Console, message: str) -> None:
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[red]error: {escape(message)}[/red]")
    raise typer.Exit(1)
