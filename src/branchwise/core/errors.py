"""Domain errors: what went wrong, in the domain's words. No HTTP status codes here: the edge
(`wire.errors`) maps each class to one, in one place.

Every error names the request field it concerns (`param`, OpenAI's dotted path) and a
machine-readable `code`, because clients branch on both.
"""

from __future__ import annotations


class BranchwiseError(Exception):
    """Base of every error a client is meant to see."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retryable: bool | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.retryable = retryable
        """Whether the same request may succeed later (None: the client decides)."""


class InvalidRequest(BranchwiseError):
    """The request cannot be carried out as asked: a bad value, a combination that makes no
    sense, a reference to something of the wrong kind, a locked conversation."""


class NotFound(BranchwiseError):
    """What the request names does not exist (or is not the caller's)."""


class Conflict(BranchwiseError):
    """The stored state does not allow it now: e.g. gave up waiting in a conversation's queue.
    With `retry_after`, the same request may succeed after that many seconds."""

    def __init__(self, message: str, *, retry_after: int | None = None, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class Unprocessable(BranchwiseError):
    """Well-formed, but it contradicts what the same request said before (an Idempotency-Key
    reused with another body)."""


class RateLimited(BranchwiseError):
    """Over a limit of the caller's API key: the same request may succeed after `retry_after`
    seconds."""

    def __init__(self, message: str, *, retry_after: int = 1, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ModelFailed(BranchwiseError):
    """The model behind the request failed to answer a request that needed it at once."""


class LimitReached(BranchwiseError):
    """A limit on how much one client may hold at once, or for how long, was reached (WebSocket
    connections: how many are open, how long one stays open)."""


class ServerFault(BranchwiseError):
    """branchwise itself could not do it."""


class Unavailable(BranchwiseError):
    """branchwise cannot do it now, for want of a shared resource (every database connection it
    may open is busy): the same request may succeed after `retry_after` seconds."""

    def __init__(self, message: str, *, retry_after: int = 1, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after


def not_found(kind: str, id: str) -> NotFound:
    return NotFound(f"{kind} with id '{id}' not found.")
