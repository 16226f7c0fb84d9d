"""Identifiers: OpenAI's prefixes followed by 48 lowercase hex characters.

Every id starts with the time it was made (microseconds, 14 hex characters), then random hex.
New rows' keys therefore land at the right-hand edge of each index instead of anywhere in it:
with fully random ids, a stored response wrote a different leaf page of every index, which the
database's page cache held less and less of as the tables grew. The random part (136 bits in
public ids, 72 in node ids) keeps them unguessable.

The random parts come from the operating system's generator 128 at a time (`_random_hex`): a
stored response makes about six ids, and each `os.urandom` call is a system call. Each part is
handed out once, whatever the thread, and a forked child starts afresh, so no two ids share
random digits. docs/decisions/0005 has the measurements.
"""

from __future__ import annotations

import os
import time

_PER_REFILL = 128  # random parts made at a time: 128 x 17 bytes from the OS in one call
_parts = iter(())  # of 34 hex digits each; `next` on a list iterator is atomic, so threads never share one


def _forget() -> None:  # (in a forked child: never hand out the parent's digits)
    global _parts
    _parts = iter(())


os.register_at_fork(after_in_child=_forget)


def _random_hex() -> str:
    """34 random hex digits (136 bits)."""
    global _parts
    part = next(_parts, None)
    if part is None:
        raw = os.urandom(17 * _PER_REFILL).hex()
        _parts = parts = iter([raw[k:k + 34] for k in range(0, len(raw), 34)])
        part = next(parts)
    return part


def _stamp() -> str:
    return f"{time.time_ns() // 1000:014x}"


def new_id(prefix: str) -> str:
    return f"{prefix}_{_stamp()}{_random_hex()}"


def new_node() -> str:
    """Node ids are internal: 32 hex characters."""
    return _stamp() + _random_hex()[:18]


def now() -> int:
    return int(time.time())
