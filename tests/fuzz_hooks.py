"""schemathesis hooks for tests/test_openapi.py (loaded by `SCHEMATHESIS_HOOKS`, in the
schemathesis process): half of the generated ids become ids that exist.

Random ids only ever reach the "not found" answer; real ones take the fuzzed query parameters
and bodies on into the services and the database. Which half is decided by a hash of the
generated value, so a run stays deterministic. `BRANCHWISE_FUZZ_IDS` holds the real ids, a JSON
object of parameter or body field name -> id, made by the test before the run.
"""

from __future__ import annotations

import json
import os
import zlib

import schemathesis

IDS: dict[str, str] = json.loads(os.environ.get("BRANCHWISE_FUZZ_IDS", "{}"))
BODY_FIELDS = ("conversation", "previous_response_id", "item_id")


def _real(name: str, value) -> object:
    real = IDS.get(name)
    if real is None or zlib.crc32(repr(value).encode()) % 2:
        return value
    return real


@schemathesis.hook
def map_path_parameters(context, path_parameters):
    if not path_parameters:  # (None for a route without any)
        return path_parameters
    return {name: _real(name, value) for name, value in path_parameters.items()}


@schemathesis.hook
def map_body(context, body):
    if isinstance(body, dict):
        for name in BODY_FIELDS:
            if isinstance(body.get(name), str):
                body[name] = _real(name, body[name])
    return body
