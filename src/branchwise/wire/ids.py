"""What a well-formed id looks like, per kind, and the one check every route uses on the ids a
client sends (path segments, body fields, `after`).

A malformed id is a 400 in OpenAI's words ("Invalid 'response_id': 'abc'. Expected an ID that
begins with 'resp'."), decided without a database round trip; a well-formed id that names
nothing stays a 404. Well-formed means the kind's prefix, `_`, then letters, digits, `_` or `-`,
64 characters at most: every id branchwise makes (`core.ids`) is, and nothing that a database
refuses to compare (a NUL on PostgreSQL) or that is pointlessly long gets as far as one.
"""

from __future__ import annotations

import re

from pydantic_core import PydanticCustomError

from branchwise.core.errors import InvalidRequest

MAX_ID_CHARS = 64

PREFIXES: dict[str, tuple[str, ...]] = {
    "response": ("resp",),
    "conversation": ("conv",),
    # every item kind branchwise stores (wire.items, wire.events): input items always get fresh ids
    "item": ("msg", "fc", "fco", "rs", "cmp"),
    "prompt": ("pmpt",),
}

_PATTERNS = {
    kind: re.compile(rf"(?:{'|'.join(p)})_[0-9A-Za-z_-]{{1,{MAX_ID_CHARS - 1 - max(map(len, p))}}}")
    for kind, p in PREFIXES.items()
}


def _expected(kind: str) -> str:
    p = [f"'{x}'" for x in PREFIXES[kind]]
    return p[0] if len(p) == 1 else f"{', '.join(p[:-1])} or {p[-1]}"


def _shown(value: str) -> str:
    return value if len(value) <= MAX_ID_CHARS else value[:MAX_ID_CHARS] + "..."


def id_problem(value: str, kind: str) -> str | None:
    """None for a well-formed id of `kind`, else what is expected of one."""
    if _PATTERNS[kind].fullmatch(value):
        return None
    if not value.startswith(tuple(p + "_" for p in PREFIXES[kind])):
        return f"Expected an ID that begins with {_expected(kind)}."
    return (f"Expected an ID that begins with {_expected(kind)} followed by letters, digits, '_' or '-', "
            f"{MAX_ID_CHARS} characters in all at most.")


def check_id(value: str, kind: str, param: str) -> str:
    """`value` if it is a well-formed id of `kind`; else the 400 (for path segments and query
    parameters, whose names are known here)."""
    if _PATTERNS[kind].fullmatch(value):
        return value
    raise InvalidRequest(f"Invalid '{param}': '{_shown(value)}'. {id_problem(value, kind)}", param=param,
                         code="invalid_value")


def id_validator(kind: str):
    """The same check as a pydantic after-validator, for body fields (whose path `wire.errors`
    knows): the error names the field as the client wrote it (`input[2].id`)."""
    pattern = _PATTERNS[kind]

    def check(value: str) -> str:
        if pattern.fullmatch(value):
            return value
        raise PydanticCustomError("invalid_id", "{problem}", {"problem": id_problem(value, kind),
                                                              "shown": _shown(value)})
    return check
