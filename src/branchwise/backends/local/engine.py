"""The decode loop: every sequence of the embedded model, decoded together on one thread.

llama.cpp decodes several sequences in one batch for little more than one (the weights are read
once per step). The engine does what llama.cpp's own server does (continuous batching):

- `parallel` slots, each a llama.cpp sequence with its own KV stream of `window` cells. A
  sequence (`Job`) waits in a FIFO until a slot is free; each step, the next token of every
  generating sequence and up to `BATCH_TOKENS` prompt tokens of the newly admitted ones go into
  one `llama_decode`. A job that arrives mid-generation joins at the next step; one that
  finishes, or is cancelled, leaves its slot at once while the others go on.
- Prefix reuse. A slot keeps the tokens whose KV it holds after its job leaves. A new job
  starts from the longest prefix of its prompt held by any slot: its own slot's cells are kept
  and the rest dropped, or another slot's stream is copied into it (`llama_memory_seq_cp`, a
  memory copy) and cut to that prefix. Only the rest of the prompt is decoded (at least its
  last token, for the logits). So the alternatives of one request, several responses on one
  conversation, and a follow-up on a cached branch read a common prefix once. A job whose
  prompt shares more with a prompt being read right now than with anything cached waits for
  that read.
- A stream per sequence, rather than one cache all sequences share, keeps each sequence's
  cells in position order: llama.cpp's attention sums over cells in cell order, so a sequence
  whose cells were interleaved differently would get other logits. With a stream each, a
  seeded request gives the same text alone, batched, or from a cached prefix.
- Memory is `parallel x window` cells, allocated when the model loads; a slot never holds more
  than a window, so a decode never runs out of cells (docs/embedded.md).

Jobs come from the event loop (`submit`) and report back to it (`Job.sink`), a step's reports
in one `call_soon_threadsafe` per loop. Cancelling is a flag the loop sets and the engine reads
at the start of each step. ctypes releases the GIL for the length of each llama.cpp call
(decoding, sampling), so the event loop runs meanwhile.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from branchwise.backends.local.model import BATCH_TOKENS, Model
from branchwise.backends.local.sampling import Sampler, Sampling, StopText

log = logging.getLogger(__name__)

SHARE_MIN = 16
"""A job waits for a prompt being read when that gives it at least this many more tokens of
shared prefix than the cache does now (a step's wait against decoding them again)."""


@dataclass(eq=False, slots=True)
class Job:
    """One sequence to generate: `prompt` tokens in, text out through `sink`."""

    prompt: list[int]
    sampling: Sampling
    max_tokens: int
    stop: list[str]
    sink: Callable[[list[tuple[str, Any]]], None]
    """Called on the job's event loop with its events of one step, in order: ("text", str),
    then one ("done", Outcome) or ("error", Exception)."""
    loop: asyncio.AbstractEventLoop
    cancelled: bool = False
    # engine-side state
    sampler: Sampler | None = None
    text: StopText | None = None
    tokens: int = 0
    cached: int = 0
    slot: int = -1


@dataclass(slots=True)
class Outcome:
    finish_reason: str  # stop | length | cancelled
    tokens: int
    """Tokens sampled (an end-of-generation token not counted)."""
    cached: int
    """Prompt tokens whose KV was already there (not decoded again)."""


@dataclass(eq=False, slots=True)
class _Slot:
    id: int
    cache: list[int] = field(default_factory=list)
    """Tokens whose KV this sequence id holds, at positions 0..len-1."""
    job: Job | None = None
    pending: list[int] = field(default_factory=list)
    """Prompt tokens still to decode."""
    next_token: int = -1
    """Sampled, not decoded yet (goes into the next batch)."""
    out: int = -1
    """This step: the batch position of the logits to sample from, or -1."""
    used: int = 0


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class Engine:
    def __init__(self, model: Model, on_cancelled: Callable[[int], None] | None = None) -> None:
        self.model = model
        self._slots = [_Slot(i) for i in range(model.parallel)]
        self._waiting: deque[Job] = deque()
        self._incoming: list[Job] = []
        self._cv = threading.Condition()
        self._stopping = False
        self._clock = itertools.count(1)
        self._on_cancelled = on_cancelled
        self._thread = threading.Thread(target=self._run, name="branchwise-llama", daemon=True)
        self.prompt_tokens_decoded = 0
        """Prompt tokens decoded so far (the rest came from the cache)."""
        self.steps = 0
        self._thread.start()

    # -- from the event loop -------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Sequences waiting for a slot."""
        return len(self._incoming) + len(self._waiting)

    @property
    def active(self) -> int:
        """Sequences holding a slot (reading their prompt or generating)."""
        return sum(1 for s in self._slots if s.job is not None)

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping:
                raise RuntimeError("the embedded model has been closed")
            self._incoming.append(job)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        with self._cv:
            self._cv.notify()

    def stop(self) -> None:
        """Ends the loop (jobs still there end with an error); returns once it has."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join()

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        out: dict[Job, list[tuple[str, Any]]] = {}
        try:
            while True:
                with self._cv:
                    while not (self._incoming or self._waiting or self._stopping or self.active):
                        self._cv.wait()
                    self._waiting.extend(self._incoming)
                    self._incoming.clear()
                    if self._stopping:
                        break
                try:
                    self._step(out)
                except Exception as e:  # a failed decode: the sequences in it end with the error
                    log.exception("embedded model: decode failed")
                    for slot in self._slots:
                        if slot.job is not None:
                            self._finish(slot, out, error=e)
                        self._forget(slot)
                self._deliver(out)
        finally:
            err = RuntimeError("the embedded model has been closed")
            with self._cv:
                self._stopping = True
                self._waiting.extend(self._incoming)
                self._incoming.clear()
            for slot in self._slots:
                if slot.job is not None:
                    self._finish(slot, out, error=err)
            while self._waiting:
                job = self._waiting.popleft()
                out.setdefault(job, []).append(("error", err))
            self._deliver(out)

    def _step(self, out: dict[Job, list[tuple[str, Any]]]) -> None:
        import llama_cpp as L

        for slot in self._slots:
            if slot.job is not None and slot.job.cancelled:
                self._finish(slot, out, reason="cancelled")
        if any(j.cancelled for j in self._waiting):
            for job in [j for j in self._waiting if j.cancelled]:
                self._waiting.remove(job)
                self._report(out, job, "done", Outcome("cancelled", 0, 0))
        self._admit(out)

        model, batch = self.model, self.model.batch
        n = 0

        def add(token: int, pos: int, seq: int, logits: bool) -> None:
            nonlocal n
            batch.token[n] = token
            batch.pos[n] = pos
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = seq
            batch.logits[n] = logits
            n += 1

        added: list[tuple[_Slot, list[int]]] = []
        for slot in self._slots:
            slot.out = -1
            if slot.job is not None and not slot.pending:
                slot.out = n
                add(slot.next_token, len(slot.cache), slot.id, True)
                added.append((slot, [slot.next_token]))
        for slot in sorted((s for s in self._slots if s.job is not None and s.pending), key=lambda s: s.used):
            room = BATCH_TOKENS - n
            if room <= 0:
                break
            chunk = slot.pending[:room]
            start = len(slot.cache)
            last = len(chunk) == len(slot.pending)
            for i, token in enumerate(chunk):
                add(token, start + i, slot.id, last and i == len(chunk) - 1)
            if last:
                slot.out = n - 1
            added.append((slot, chunk))
            self.prompt_tokens_decoded += len(chunk)
        if n == 0:
            return
        batch.n_tokens = n
        rc = L.llama_decode(model.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        self.steps += 1
        for slot, tokens in added:
            slot.cache.extend(tokens)
            if slot.pending:
                del slot.pending[: len(tokens)]
        for slot in self._slots:
            if slot.out >= 0 and slot.job is not None:
                self._sampled(slot, slot.job.sampler.sample(model.ctx, slot.out), out)

    def _admit(self, out: dict[Job, list[tuple[str, Any]]]) -> None:
        import llama_cpp as L

        mem = self.model.memory
        for job in list(self._waiting):
            free = [s for s in self._slots if s.job is None]
            if not free:
                return
            have, source = 0, None
            for s in self._slots:
                k = _common(s.cache, job.prompt)
                if k > have or (k == have and source is not None and source.job is not None and s.job is None):
                    have, source = k, s
            reading = max((_common(s.job.prompt, job.prompt) for s in self._slots
                           if s.job is not None and s.pending), default=0)
            if reading - have >= SHARE_MIN:
                continue  # next step, once that prompt is read, it starts from it
            self._waiting.remove(job)
            if source is not None and source.job is None:
                target = source
            else:
                target = min(free, key=lambda s: (len(s.cache) > 0, s.used))
            keep = min(have, len(job.prompt) - 1)
            if target is source:
                L.llama_memory_seq_rm(mem, target.id, keep, -1)
                del target.cache[keep:]
            else:
                L.llama_memory_seq_rm(mem, target.id, -1, -1)
                target.cache = []
                if keep > 0 and source is not None:
                    # (between streams llama.cpp copies a whole sequence, then we cut it)
                    L.llama_memory_seq_cp(mem, source.id, target.id, -1, -1)
                    L.llama_memory_seq_rm(mem, target.id, keep, -1)
                    target.cache = source.cache[:keep]
            try:
                job.sampler = Sampler(self.model, job.sampling)
            except Exception as e:
                self._report(out, job, "error", e)
                continue
            job.text = StopText(job.stop)
            job.cached = keep
            job.slot = target.id
            target.job = job
            target.pending = job.prompt[keep:]
            target.used = next(self._clock)

    def _sampled(self, slot: _Slot, token: int, out: dict[Job, list[tuple[str, Any]]]) -> None:
        job = slot.job
        assert job is not None and job.text is not None
        if self.model.is_eog(token):
            self._finish(slot, out, reason="stop")
            return
        job.tokens += 1
        text, stopped = job.text.feed(self.model.piece(token))
        if text:
            self._report(out, job, "text", text)
        if stopped:
            self._finish(slot, out, reason="stop", flush=False)
        elif job.tokens >= job.max_tokens or len(slot.cache) >= self.model.window:
            self._finish(slot, out, reason="length")
        else:
            slot.next_token = token

    def _finish(self, slot: _Slot, out: dict[Job, list[tuple[str, Any]]], reason: str = "",
                flush: bool = True, error: Exception | None = None) -> None:
        job = slot.job
        assert job is not None
        slot.job = None
        slot.pending = []
        slot.used = next(self._clock)
        if job.sampler is not None:
            job.sampler.close()
            job.sampler = None
        if error is not None:
            self._report(out, job, "error", error)
            return
        if reason == "cancelled":
            if self._on_cancelled is not None:
                self._on_cancelled(job.tokens)
        elif flush and job.text is not None:
            rest = job.text.flush()
            if rest:
                self._report(out, job, "text", rest)
        self._report(out, job, "done", Outcome(reason, job.tokens, job.cached))

    def _forget(self, slot: _Slot) -> None:
        import llama_cpp as L

        L.llama_memory_seq_rm(self.model.memory, slot.id, -1, -1)
        slot.cache = []
        slot.pending = []

    @staticmethod
    def _report(out: dict[Job, list[tuple[str, Any]]], job: Job, kind: str, value: Any) -> None:
        out.setdefault(job, []).append((kind, value))

    @staticmethod
    def _deliver(out: dict[Job, list[tuple[str, Any]]]) -> None:
        """Hands a step's events to their loops: one call per loop, not per token."""
        if not out:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, list[tuple[str, Any]]]]] = {}
        for job, events in out.items():
            by_loop.setdefault(job.loop, []).append((job, events))
        out.clear()
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_dispatch, items)
            except RuntimeError:  # that loop is closed: nobody is listening
                for job, _ in items:
                    job.cancelled = True


def _dispatch(items: list[tuple[Job, list[tuple[str, Any]]]]) -> None:
    for job, events in items:
        job.sink(events)
