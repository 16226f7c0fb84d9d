"""Identifiers: OpenAI's prefixes followed by 48 lowercase hex characters."""

from __future__ import annotations

import os
import time


def new_id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(24).hex()}"


def new_node() -> str:
    """Node ids are internal: 32 hex characters."""
    return os.urandom(16).hex()


def now() -> int:
    return int(time.time())
