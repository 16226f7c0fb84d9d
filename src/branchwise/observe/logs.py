"""Logs: one line per request (`branchwise.access`), the rest of the server's life at `info`
(start, migrations, the embedded model, queueing, stopping), upstream failures at `warning`;
as text for a terminal or as one JSON object a line for a log pipeline (`--log-format`).

The request line is on the hot path, so it is built cheaply: `access` makes an
`AccessRecord` (a `LogRecord` whose constructor sets only the time and the fields; logging's
caller lookup, thread and process names are skipped) and hands it to the logger's handlers;
the text is made only when a handler formats it. Nothing is built when the level hides it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import orjson

LEVELS = ("critical", "error", "warning", "info", "debug")
FORMATS = ("text", "json")
ACCESS = logging.getLogger("branchwise.access")


def _escaped(value: str) -> str:
    """A client-sent string (a path, a model name) made safe for a one-line log."""
    return value if value.isprintable() else value.encode("unicode_escape").decode("ascii")


FIELDS = ("method", "path", "status", "duration_ms", "response_id", "response_status", "conversation_id",
          "model", "input_tokens", "output_tokens", "upstream_ms")
"""A request line's fields, in the order `access` takes them (the JSON line's keys)."""
_PLAIN = "%s %s %d %.2fms"
_RESPONSE = _PLAIN + " response=%s (%s) conversation=%s model=%s tokens=%s+%s upstream=%.2fms"
_TEXT_HEAD = "%s.%03d INFO    branchwise.access: "


def access_text(values: tuple) -> str:
    """The text of a request line: `METHOD path status duration`, then, for a response, what
    it did."""
    if values[4] is None:
        return _PLAIN % (values[0], _escaped(values[1]), *values[2:4])
    return _RESPONSE % (values[0], _escaped(values[1]), *values[2:6], values[6] or "-", _escaped(values[7] or ""),
                        *("-" if v is None else v for v in values[8:10]), values[10])


class AccessRecord(logging.LogRecord):
    """One request's log record, for a logging configuration other than the server's own.
    Everything logging's handlers and formatters read is here; only the time and the request's
    fields (`FIELDS`, as a tuple) are set per request."""

    name = ACCESS.name
    levelno = logging.INFO
    levelname = "INFO"
    msg = "%s"
    pathname = filename = module = funcName = "access"
    lineno = 0
    exc_info = exc_text = stack_info = None
    thread = threadName = processName = taskName = None

    def __init__(self, values: tuple):  # (no super().__init__: that is the cost saved)
        self.created = time.time()
        self.args = values

    @property
    def msecs(self) -> float:
        return (self.created - int(self.created)) * 1000

    @property
    def relativeCreated(self) -> float:  # noqa: N802 - logging's name
        return (self.created - logging._startTime) * 1000

    @property
    def process(self) -> int:
        return os.getpid()

    def getMessage(self) -> str:  # noqa: N802 - logging's name
        return access_text(self.args)

    def fields(self) -> dict[str, Any]:
        return {k: v for k, v in zip(FIELDS, self.args, strict=True) if v is not None}


def _through_logging(method, path, status, ms, rid=None, rstatus=None, conv=None, model=None, tin=None, tout=None,
                     upstream=None) -> None:
    ACCESS.handle(AccessRecord((method, path, status, ms, rid, rstatus, conv, model, tin, tout, upstream)))


access = _through_logging
"""Log one request's line: `access(method, path, status, duration_ms, [response_id,
response_status, conversation_id, model, input_tokens, output_tokens, upstream_ms])`; the
caller checked `ACCESS.isEnabledFor(INFO)`. The server's own configuration (`AccessHandler`)
replaces it with a writer that formats and writes the line in one step; any other
configuration gets it through logging as usual."""


class AccessHandler(logging.StreamHandler):
    """stderr, for the request lines, which it writes without logging's per-record dispatch
    (records, filters, locks, an explicit flush: stderr is line-buffered): the whole line is one
    format and one write, about a third of what logging costs (decision 0043). Once a second it
    checks that it is still the request logger's only handler; if not, lines go through logging."""

    def __init__(self, stream=None, json: bool = False):
        super().__init__(stream)
        global access
        access = self._writer(json)

    def _writer(self, json: bool):
        write, handler, now, localtime, gmtime, strftime = self.stream.write, self, time.time, time.localtime, \
            time.gmtime, time.strftime
        state = [-1, "", False]  # the second, its text, whether this handler is still in place

        def text(method, path, status, ms, rid=None, rstatus=None, conv=None, model=None, tin=None, tout=None,
                 upstream=None) -> None:
            t = now()
            second = int(t)
            if second != state[0]:
                state[:] = [second, strftime("%Y-%m-%d %H:%M:%S", localtime(second)),
                            ACCESS.handlers == [handler] and not ACCESS.propagate]
            if not state[2]:
                return _through_logging(method, path, status, ms, rid, rstatus, conv, model, tin, tout, upstream)
            if not path.isprintable():
                path = _escaped(path)
            try:
                if rid is None:
                    write((_TEXT_HEAD + _PLAIN + "\n") % (state[1], (t - second) * 1000, method, path, status, ms))
                else:
                    if not model.isprintable():
                        model = _escaped(model)
                    write((_TEXT_HEAD + _RESPONSE + "\n") % (state[1], (t - second) * 1000, method, path, status, ms,
                                                            rid, rstatus, conv or "-", model,
                                                            "-" if tin is None else tin, "-" if tout is None else tout,
                                                            upstream))
            except Exception:
                handler.handleError(AccessRecord((method, path, status, ms)))

        def json_line(method, path, status, ms, rid=None, rstatus=None, conv=None, model=None, tin=None, tout=None,
                      upstream=None) -> None:
            t = now()
            second = int(t)
            if second != state[0]:
                state[:] = [second, strftime("%Y-%m-%dT%H:%M:%S", gmtime(second)),
                            ACCESS.handlers == [handler] and not ACCESS.propagate]
            if not state[2]:
                return _through_logging(method, path, status, ms, rid, rstatus, conv, model, tin, tout, upstream)
            values = (method, path, status, ms, rid, rstatus, conv, model, tin, tout, upstream)
            line = {"time": f"{state[1]}.{int((t - second) * 1000):03d}Z", "level": "info",
                    "logger": "branchwise.access", "message": access_text(values)}
            line.update((k, v) for k, v in zip(FIELDS, values, strict=True) if v is not None)
            try:
                write(orjson.dumps(line).decode() + "\n")
            except Exception:
                handler.handleError(AccessRecord((method, path, status, ms)))

        return json_line if json else text


class _Clock:
    """The time stamp's formatted seconds, made once a second rather than once a line."""

    def __init__(self, fmt: str, convert):
        self.fmt, self.convert = fmt, convert
        self.second, self.text = -1, ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self.second:
            self.second, self.text = second, time.strftime(self.fmt, self.convert(second))
        return f"{self.text}.{int((created - second) * 1000):03d}"


class TextFormatter(logging.Formatter):
    """`2025-01-02 03:04:05.678 INFO    branchwise.access: POST /v1/responses 200 2.31ms ...`
    (local time)."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.clock = _Clock("%Y-%m-%d %H:%M:%S", time.localtime)

    def format(self, record: logging.LogRecord) -> str:
        if type(record) is AccessRecord:  # (the one line every request writes: kept short)
            return f"{self.clock(record.created)} INFO    branchwise.access: {access_text(record.args)}"
        line = f"{self.clock(record.created)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: `time` (UTC, ISO 8601), `level`, `logger`, `message`, and the
    record's fields (a request's method, path, status, ..., or the `fields` a record was logged
    with as `extra={"fields": {...}}`), `exception` when there is one."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.clock = _Clock("%Y-%m-%dT%H:%M:%S", time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": self.clock(record.created) + "Z", "level": record.levelname.lower(),
                               "logger": record.name, "message": record.getMessage()}
        if isinstance(record, AccessRecord):
            out.update(record.fields())
        else:
            fields = getattr(record, "fields", None)
            if isinstance(fields, dict):
                out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def log_config(level: str = "info", fmt: str = "text") -> dict[str, Any]:
    """The `logging.config.dictConfig` of a server process (uvicorn applies it in each worker):
    branchwise's loggers at `level`; uvicorn's and other libraries' at `warning` (their start
    and stop lines repeat branchwise's own), everything at `debug` when `level` is debug."""
    level = level.upper()
    others = level if level == "DEBUG" else "WARNING"
    formatter = JsonFormatter if fmt == "json" else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"branchwise": {"()": f"{formatter.__module__}.{formatter.__qualname__}"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "branchwise",
                                "stream": "ext://sys.stderr"},
                     "access": {"()": f"{__name__}.AccessHandler", "formatter": "branchwise",
                                "stream": "ext://sys.stderr", "json": fmt == "json"}},
        "root": {"level": others, "handlers": ["stderr"]},
        "loggers": {
            "branchwise": {"level": level, "propagate": True},
            "branchwise.access": {"handlers": ["access"], "propagate": False},
            "uvicorn": {"level": others, "handlers": [], "propagate": True},
            "uvicorn.error": {"level": others},
            "uvicorn.access": {"level": "WARNING"},  # branchwise writes the request lines
        },
    }


def masked_url(url: str) -> str:
    """A database URL fit for a log or a banner: its password, if any, as ***."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(a database URL that does not parse)"


def uvicorn_level(level: str) -> str:
    """The level uvicorn sets on its own loggers (`uvicorn.run(log_level=...)`)."""
    return "debug" if level.lower() == "debug" else "warning"
