"""Who is asking: the project a request acts for, and the concurrency slot it holds.

Every stored object belongs to one project, the project of the API key that made it; a request
sees only its own project's objects (docs/security.md). The `Auth` middleware resolves the key
and sets the caller for the request's task here; the repository reads the project when it
builds a statement's parameters, so every statement that reads or writes stored objects by id
carries it, and no service signature has to pass it along
(docs/decisions/0051-project-per-request-context.md).

Tasks started while a request runs (a stored stream, a background response) copy the request's
context, so they act for the same project. A statement grouped with other requests' statements
(`store.group_commit`) runs in whichever task flushes the group: the repository therefore reads
the project in the caller's task, when it builds the parameters, never in a flush.

Without any API key configured there is one project, `default`, and nothing is set per request.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from typing import Protocol

DEFAULT_PROJECT = "default"


class Slot(Protocol):
    """One of a key's concurrent responses (`max_concurrent`), held until the request and any run
    it started have finished: each holder calls `hold` once and `drop` once."""

    def hold(self) -> None: ...

    async def drop(self) -> None: ...


class Caller:
    __slots__ = ("project", "key_id", "slot", "key")

    def __init__(self, project: str, key_id: str | None = None, slot: Slot | None = None, key: object = None):
        self.project = project
        self.key_id = key_id
        self.slot = slot
        self.key = key  # the API key (`services.keys.Key`), for limits counted after the handshake


_NOBODY = Caller(DEFAULT_PROJECT)
_CALLER: ContextVar[Caller] = ContextVar("branchwise_caller", default=_NOBODY)


def current_project() -> str:
    """The project the running request acts for (`default` outside any request)."""
    return _CALLER.get().project


def current_caller() -> Caller:
    return _CALLER.get()


def enter(caller: Caller) -> Token:
    """Act for `caller` in this context until `leave(token)`."""
    return _CALLER.set(caller)


def leave(token: Token) -> None:
    _CALLER.reset(token)


def hold_slot() -> Slot | None:
    """The caller's concurrency slot, held once more (by a run that outlives its request); the
    holder drops it when it ends. None when the caller holds none."""
    slot = _CALLER.get().slot
    if slot is not None:
        slot.hold()
    return slot
