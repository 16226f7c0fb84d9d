"""Concurrency policies for responses (and item appends) on one conversation.

- `branch`: no lease. Every response runs from the head it saw; the first to commit moves the
  head (compare-and-swap), the others stay sibling branches.
- `queue`: take a place in the conversation's line (a lease row in the database), wait until
  it is at the front, then run on the head as it is then.
- `reject`: take the lease only if the line is empty, else HTTP 400 `conversation_locked`,
  as OpenAI does.

Leases live in the database, so several server processes share one line. A holder renews its
lease while it runs or waits; a crashed process's leases expire after `lease_ttl` seconds.
Waiters poll the database (`queue_poll_interval`) and are woken at once by releases made
in their own process.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from branchwise.core.errors import Conflict, InvalidRequest
from branchwise.observe import metrics
from branchwise.settings import Settings
from branchwise.store.leases import Leases

LOCKED_MESSAGE = "Another process is currently operating on this conversation. Please retry in a few seconds."


class QueueTimeout(Conflict):
    def __init__(self, waited: float):
        super().__init__(
            f"Gave up waiting for the responses before this one on the conversation after {waited:.0f} seconds "
            "(concurrency: queue). Retry later, or use concurrency 'branch'.",
            param="conversation", code="conversation_queue_timeout", retryable=False,
        )


class ClientGone(Exception):
    """The client disconnected while waiting in line."""


def locked() -> InvalidRequest:
    return InvalidRequest(LOCKED_MESSAGE, param="conversation", code="conversation_locked")


class Lease:
    def __init__(self, policies: Policies, conv_id: str, seq: int):
        self.policies = policies
        self.conv_id = conv_id
        self.seq = seq
        self.released = False

    async def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.policies._held.discard(self.seq)
        await self.policies.leases.release(self.seq)
        self.policies._wake_up(self.conv_id)


class Policies:
    def __init__(self, leases: Leases, settings: Settings):
        self.leases = leases
        self.settings = settings
        self._held: set[int] = set()
        self._events: dict[str, asyncio.Event] = {}
        self._renewer: asyncio.Task | None = None

    def _wake_up(self, conv_id: str) -> None:
        ev = self._events.pop(conv_id, None)
        if ev is not None:
            ev.set()

    def _hold(self, conv_id: str, seq: int) -> Lease:
        self._held.add(seq)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())
        return Lease(self, conv_id, seq)

    async def _renew_forever(self) -> None:
        ttl = self.settings.lease_ttl
        while self._held:
            await asyncio.sleep(ttl / 3)
            with contextlib.suppress(Exception):
                await self.leases.renew(list(self._held), ttl)

    async def acquire(self, conv_id: str, holder: str, policy: str,
                      disconnected: Callable[[], Awaitable[bool]] | None = None) -> Lease | None:
        """The lease `policy` needs before running on `conv_id` (None for `branch`)."""
        ttl = self.settings.lease_ttl
        if policy == "branch":
            return None
        if policy == "reject":
            seq = await self.leases.take_if_free(conv_id, holder, ttl)
            if seq is None:
                raise locked()
            return self._hold(conv_id, seq)
        lease = self._hold(conv_id, await self.leases.enqueue(conv_id, holder, ttl))
        started = time.monotonic()
        gauge = metrics.queued("conversation")
        gauge.inc()
        try:
            while await self.leases.first(conv_id) != lease.seq:
                waited = time.monotonic() - started
                if waited > self.settings.queue_timeout:
                    raise QueueTimeout(waited)
                if disconnected is not None and await disconnected():
                    raise ClientGone()
                ev = self._events.setdefault(conv_id, asyncio.Event())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ev.wait(), self.settings.queue_poll_interval)
        except BaseException:
            await asyncio.shield(lease.release())
            raise
        finally:
            gauge.dec()
        return lease
