"""Prometheus metrics (prometheus-client), served at `GET /metrics`.

With `--workers N` every worker counts into files under `PROMETHEUS_MULTIPROC_DIR` (the
library's multiprocess mode; `branchwise serve` makes and empties that directory), and any
worker answering `/metrics` reports the sum over all of them. The directory must be set before
`prometheus_client` is imported, which `cli/serve.py` does before a worker imports this module.

On the hot path a request adds to plain counts in this process (`request`, `upstream_call`,
`running`); `flush` hands them to prometheus-client before each scrape and every second. The
names, labels and what to alert on are in docs/operations.md.
"""

from __future__ import annotations

import os
from bisect import bisect_left

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds: a stored response takes a few ms of branchwise's time, a model answer seconds to
# minutes, so the buckets span both.
BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
MAX_MODEL_LABELS = 100
"""Distinct model names kept as label values; later names count as `other` (with the embedded
model any name is accepted, and each name would otherwise be a new series)."""

HTTP = Histogram("branchwise_http_request_duration_seconds",
                 "HTTP requests by method, route (the path template) and status: the time until the "
                 "reply was sent (for a stream, until its end); _count is the number of requests.",
                 ["method", "route", "status"], buckets=BUCKETS)
UPSTREAM = Histogram("branchwise_upstream_request_duration_seconds",
                     "Calls to a model by upstream, model and outcome (ok, or the error code: "
                     "upstream_unavailable, upstream_timeout, ..., cancelled); _count is the number of calls.",
                     ["upstream", "model", "outcome"], buckets=BUCKETS)
TOKENS = Counter("branchwise_tokens", "Tokens the models read (direction=input) and wrote (output), as "
                 "their usage reports them.", ["upstream", "model", "direction"])
RUNNING = Gauge("branchwise_responses_running", "Responses whose model is generating now.",
                multiprocess_mode="livesum")
QUEUED = Gauge("branchwise_responses_queued",
               "Responses waiting: for a background worker (reason=background), for the responses "
               "before them on their conversation (reason=conversation, concurrency: queue), or for "
               "a model that runs a fixed number at once (reason=model, the embedded model).",
               ["reason"], multiprocess_mode="livesum")
MODEL_QUEUE = Gauge("branchwise_model_queue_depth",
                    "Requests waiting for a model that runs a fixed number at once (the embedded "
                    "model: one), by upstream.", ["upstream"], multiprocess_mode="livesum")

# -- the hot path: plain counts in this process, handed to prometheus-client by `flush`

_WIDTH = len(BUCKETS) + 2  # a count per bucket, +Inf's, then the sum
_http: dict[tuple[str, str, int], list] = {}
_upstream: dict[tuple[str, str, str], list] = {}
_models: set[str] = set()
running = 0
"""Responses whose model is generating in this process now (`branchwise_responses_running`)."""


def request(method: str, route: str, status: int, seconds: float) -> None:
    key = (method, route, status)
    counts = _http.get(key)
    if counts is None:
        counts = _http[key] = [0] * _WIDTH
    counts[bisect_left(BUCKETS, seconds)] += 1  # (Prometheus buckets hold values <= their bound)
    counts[-1] += seconds


def upstream_call(upstream: str, model: str, outcome: str, seconds: float,
                  input_tokens: int = 0, output_tokens: int = 0) -> None:
    """One model call: its histogram's counts, then its tokens in two more slots of the same
    list (one lookup a call)."""
    if model not in _models:
        if len(_models) >= MAX_MODEL_LABELS:
            model = "other"
        else:
            _models.add(model)
    key = (upstream, model, outcome)
    counts = _upstream.get(key)
    if counts is None:
        counts = _upstream[key] = [0] * (_WIDTH + 2)
    counts[bisect_left(BUCKETS, seconds)] += 1
    counts[_WIDTH - 1] += seconds
    counts[-2] += input_tokens
    counts[-1] += output_tokens


def flush() -> None:
    """Hand what this process counted since the last flush to prometheus-client (in
    multiprocess mode: to this process's files, which any worker's `/metrics` reads). Called
    before each scrape this process answers and every `FLUSH_INTERVAL` seconds (`app.py`).

    A histogram's counts go in by bucket (its children's `_buckets` and `_sum`): the library
    has no call for many observations at once, and one `observe` per request costs more than
    the rest of the request's metrics and log line together (decision 0043)."""
    for table, metric in ((_http, HTTP), (_upstream, UPSTREAM)):
        for key, counts in table.items():
            if not any(counts):
                continue
            child = metric.labels(*map(str, key))
            for i in range(_WIDTH - 1):
                if counts[i]:
                    child._buckets[i].inc(counts[i])
            child._sum.inc(counts[_WIDTH - 1])
            if table is _upstream:
                for direction, n in (("input", counts[-2]), ("output", counts[-1])):
                    if n:
                        TOKENS.labels(key[0], key[1], direction).inc(n)
            counts[:] = [0] * len(counts)
    RUNNING.set(running)


FLUSH_INTERVAL = 1.0


def queued(reason: str):
    """The `branchwise_responses_queued` gauge of `reason` (inc while waiting, dec after): off
    the hot path, so straight to prometheus-client."""
    return QUEUED.labels(reason)


def model_queue(upstream: str):
    return MODEL_QUEUE.labels(upstream)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


def render() -> bytes:
    """The exposition text: this process's metrics, or every worker's summed in multiprocess
    mode (each up to `FLUSH_INTERVAL` old)."""
    flush()
    if multiprocess_dir():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def process_stopped() -> None:
    """In multiprocess mode, drop this process's live gauges (a stopped worker runs nothing)."""
    if multiprocess_dir():
        multiprocess.mark_process_dead(os.getpid())
