"""Deterministic instances of JSON schemas (tool arguments, structured outputs)."""

from __future__ import annotations

from typing import Any

_MAX_SCHEMA_DEPTH = 32


def schema_instance(schema: Any, *, use_names: bool = False) -> Any:
    """A deterministic instance of a JSON ``schema``.

    Strings are ``"x"`` (or, with ``use_names``, the name of the property that
    holds them), integers ``1``, numbers ``1.0``, booleans ``true``, arrays have
    one element, objects every property, enums their first value. ``$ref`` to
    ``#/...`` (e.g. ``#/$defs/Item``) is followed; ``anyOf``/``oneOf``/``allOf``
    take their first non-null option. An untyped top-level schema gives ``{}``.
    """
    return _instance(schema, schema, None, use_names, 0)


def _resolve_ref(root: Any, ref: str) -> Any:
    if not ref.startswith("#"):
        return None
    node = root
    for key in ref[1:].split("/"):
        if not key:
            continue
        key = key.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _instance(schema: Any, root: Any, name: str | None, use_names: bool, depth: int) -> Any:
    if depth > _MAX_SCHEMA_DEPTH or not isinstance(schema, dict):
        return {} if depth == 0 else None
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return _instance(_resolve_ref(root, ref), root, name, use_names, depth + 1)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            chosen = next(
                (o for o in options if not (isinstance(o, dict) and o.get("type") == "null")), options[0]
            )
            return _instance(chosen, root, name, use_names, depth + 1)

    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        if "properties" in schema or depth == 0:
            kind = "object"
        elif "items" in schema:
            kind = "array"
        else:
            kind = "string"

    if kind == "object":
        props = schema.get("properties")
        if not isinstance(props, dict):
            return {}
        return {key: _instance(sub, root, key, use_names, depth + 1) for key, sub in props.items()}
    if kind == "array":
        return [_instance(schema.get("items", {}), root, name, use_names, depth + 1)]
    if kind == "string":
        return name if use_names and name else "x"
    if kind == "integer":
        return int(_bounded(schema, 1))
    if kind == "number":
        return float(_bounded(schema, 1.0))
    if kind == "boolean":
        return True
    return None


def _bounded(schema: dict[str, Any], value: float) -> float:
    low = schema.get("minimum")
    high = schema.get("maximum")
    if isinstance(low, int | float) and value < low:
        value = low
    if isinstance(high, int | float) and value > high:
        value = high
    return value
