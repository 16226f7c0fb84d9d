"""A conversation tree for people: as a rich Tree in the terminal (`branchwise tree`, the chat's
`/tree`) and as Markdown (`branchwise export --format md`).

Both draw every branch. A run of items with one child each is drawn as one list at one level;
only a fork nests: each of its children starts a branch (marked ↳) under the item it forks
from, and the rest of that branch's run is listed under its first line. A long conversation
stays as wide as its number of forks, not its length.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from rich.markup import escape
from rich.text import Text
from rich.tree import Tree


@dataclass(slots=True)
class Entry:
    """One node of the tree as drawn: `key` names it (a node, or an item id where only those are
    known), `parent` its parent's key; `text` is None when not known."""

    key: str
    parent: str | None
    item_id: str
    type: str
    role: str | None
    text: str | None
    created_at: int | None = None


def item_text(item: dict[str, Any]) -> str:
    """What an item says, as plain text (images and files as placeholders)."""
    kind = item.get("type")
    if kind == "message":
        return _parts_text(item.get("content"))
    if kind == "function_call":
        return f"{item.get('name')}({item.get('arguments') or ''})"
    if kind == "function_call_output":
        return _parts_text(item.get("output"))
    if kind == "reasoning":
        parts = (item.get("summary") or []) + (item.get("content") or [])
        return "\n".join(p.get("text") or "" for p in parts if isinstance(p, dict))
    return f"[{kind}]"


def _parts_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    out = []
    for p in content or []:
        t = p.get("type") if isinstance(p, dict) else None
        if t in ("input_text", "output_text"):
            out.append(p.get("text") or "")
        elif t == "refusal":
            out.append(f"(refusal) {p.get('refusal') or ''}")
        elif t == "input_image":
            out.append("[image]")
        elif t == "input_file":
            out.append(f"[file {p.get('filename') or p.get('file_id') or ''}]".replace(" ]", "]"))
    return "\n".join(out)


def first_line(text: str | None, width: int = 100) -> str:
    if text is None:
        return "…"
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= width else line[:width - 1] + "…"


def short_id(item_id: str) -> str:
    """An item id as drawn: its prefix and last 8 characters (`/switch` takes any unique end)."""
    prefix, _, rest = item_id.partition("_")
    return f"{prefix}…{rest[-8:]}" if len(rest) > 8 else item_id


def who(e: Entry) -> str:
    if e.type == "message":
        return e.role or "message"
    return {"function_call": "call", "function_call_output": "output", "reasoning": "reasoning"}.get(e.type, e.type)


_STYLES = {"user": "bold cyan", "assistant": "bold green", "system": "bold magenta", "developer": "bold magenta",
           "call": "bold yellow", "output": "yellow", "reasoning": "italic"}


class Shape:
    """The tree's shape: children per node in stored order, roots, and the head's path."""

    def __init__(self, entries: Sequence[Entry], head: str | None):
        self.entries = {e.key: e for e in entries}
        self.children: dict[str, list[str]] = {e.key: [] for e in entries}
        self.roots: list[str] = []
        for e in entries:
            if e.parent is not None and e.parent in self.children:
                self.children[e.parent].append(e.key)
            else:
                self.roots.append(e.key)
        self.head = head if head in self.entries else None
        self.on_path: set[str] = set()
        key = self.head
        while key is not None and key not in self.on_path:
            self.on_path.add(key)
            key = self.entries[key].parent if self.entries[key].parent in self.entries else None

    def leaves(self) -> list[str]:
        return [k for k, kids in self.children.items() if not kids]


# ------------------------------------------------------------------------------ the terminal


def rich_tree(title: str, entries: Sequence[Entry], head: str | None, *, full_ids: bool = False,
              width: int = 100) -> Tree:
    shape = Shape(entries, head)
    root = Tree(Text.from_markup(title))

    def label(key: str, starts_branch: bool = False) -> Text:
        e = shape.entries[key]
        role = who(e)
        on = key in shape.on_path
        t = Text()
        if starts_branch:
            t.append("↳ ", style="bold" if on else "dim")
        t.append(f"[{role}]", style=_STYLES.get(role, "bold") if on else "dim")
        t.append(" " + first_line(e.text, width), style=None if on else "dim")
        t.append(f"  {e.item_id if full_ids else short_id(e.item_id)}", style="dim")
        if key == shape.head:
            t.append("  ◀ head", style="bold reverse")
        return t

    def run(container: Tree, key: str) -> None:
        """The run from `key` into `container`, one item after another; a fork's children nest
        under the run's last item."""
        while True:
            last = container.add(label(key))
            kids = shape.children[key]
            if len(kids) != 1:
                break
            key = kids[0]
        for kid in kids:
            branch(last, kid)

    def branch(under: Tree, key: str) -> None:
        """A branch from the item `under` draws: its first item marked ↳, the rest of its run
        under that line."""
        first = under.add(label(key, True))
        kids = shape.children[key]
        if len(kids) == 1:
            run(first, kids[0])
        else:
            for kid in kids:
                branch(first, kid)

    if len(shape.roots) == 1:
        run(root, shape.roots[0])
    else:
        for r in shape.roots:
            branch(root, r)
    if not entries:
        root.add(Text("(no items)", style="dim"))
    return root


def title_of(conv_id: str, metadata: dict[str, Any], head_item: str | None, count: int) -> str:
    name = metadata.get("title")
    shown = f"[bold]{escape(name)}[/bold]  [dim]{conv_id}[/dim]" if name else f"[bold]{conv_id}[/bold]"
    return f"{shown}  [dim]{count} items, head {head_item or '-'}[/dim]"


# ------------------------------------------------------------------------------- Markdown


def _when(ts: int | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def markdown(conv_id: str, metadata: dict[str, Any], created_at: int, head_item: str | None,
             entries: Sequence[Entry], head: str | None) -> Iterator[str]:
    """The whole tree as Markdown, chunk by chunk: the run from the root, then at each fork a
    section per branch (the head's branch named so), nested as deep as the forks."""
    shape = Shape(entries, head)
    yield f"# {metadata.get('title') or conv_id}\n\n"
    yield f"- conversation: `{conv_id}`\n- created: {_when(created_at)}\n- head: `{head_item or '-'}`\n"
    for k, v in metadata.items():
        if k != "title":
            yield f"- {k}: {v}\n"
    yield "\n"

    def item(key: str) -> str:
        e = shape.entries[key]
        mark = " · **head**" if key == shape.head else ""
        text = e.text or ""
        if e.type == "function_call":
            text = f"```\n{text}\n```"
        return f"**{who(e)}** · `{e.item_id}` · {_when(e.created_at)}{mark}\n\n{text}\n\n"

    def run(key: str, number: str) -> Iterator[str]:
        while True:
            yield item(key)
            kids = shape.children[key]
            if len(kids) != 1:
                break
            key = kids[0]
        if kids:
            yield f"*{len(kids)} branches from here.*\n\n"
        for k, kid in enumerate(kids, 1):
            label = f"{number}.{k}" if number else str(k)
            level = "#" * min(6, 1 + label.count(".") + 1)
            on = " (the head's path)" if kid in shape.on_path else ""
            yield f"{level} Branch {label}{on}\n\n"
            yield from run(kid, label)

    if len(shape.roots) == 1:
        yield from run(shape.roots[0], "")
    else:
        for k, r in enumerate(shape.roots, 1):
            on = " (the head's path)" if r in shape.on_path else ""
            yield f"## Branch {k}{on}\n\n"
            yield from run(r, str(k))
