"""Identifiers: OpenAI's prefixes followed by 48 lowercase hex characters.

Every id starts with the time it was made (microseconds, 14 hex characters), then random hex.
New rows' keys therefore land at the right-hand edge of each index instead of anywhere in it:
with fully random ids, a stored response wrote a different leaf page of every index, which the
database's page cache held less and less of as the tables grew (SQLite's CPU per response rose
by two thirds over 18,000 responses). The random part (136 bits in public ids, 72 in node ids)
keeps them unguessable.
"""

from __future__ import annotations

import os
import time


def _stamp() -> str:
    return f"{time.time_ns() // 1000:014x}"


def new_id(prefix: str) -> str:
    return f"{prefix}_{_stamp()}{os.urandom(17).hex()}"


def new_node() -> str:
    """Node ids are internal: 32 hex characters."""
    return _stamp() + os.urandom(9).hex()


def now() -> int:
    return int(time.time())
