"""Message text and the ``[[name=value]]`` directives written in it."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

DIRECTIVE_RE = re.compile(r"\[\[([A-Za-z_][A-Za-z0-9_]*)(?:=(.*?))?\]\]\s*", re.DOTALL)
DIRECTIVE_ROLES = frozenset({"system", "developer", "user"})
TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})


def text_of(content: Any) -> str | None:
    """The text of a message ``content``: a string, or the text parts joined by a space."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict)
            and isinstance(part.get("text"), str)
            and part.get("type", "text") in TEXT_PART_TYPES
        )
    return None


def strip_directives(text: str) -> str:
    """Remove every ``[[...]]`` directive (and the whitespace after it), then trim."""
    if "[[" in text:
        text = DIRECTIVE_RE.sub("", text)
    return text.strip()


def parse_directives(texts: Iterable[str]) -> dict[str, str | None]:
    """Collect the directives of ``texts``, in order (later ones override earlier ones)."""
    found: dict[str, str | None] = {}
    for text in texts:
        if "[[" in text:
            for match in DIRECTIVE_RE.finditer(text):
                found[match.group(1)] = match.group(2)
    return found
