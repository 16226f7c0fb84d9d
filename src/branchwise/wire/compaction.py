"""The `compaction` item's `encrypted_content`: what POST /v1/responses/compact hands out and
what comes back as input to restore the compacted context.

OpenAI's is ciphertext only OpenAI can read. branchwise keeps no secret from the client that
owns the conversation, so its content is signed, not encrypted: a version tag, the payload
(JSON, base64url) and an HMAC-SHA256 of both under the server's compaction key, joined by dots:

    bw1.<base64url(payload JSON)>.<base64url(HMAC-SHA256(key, "bw1." + payload part))>

The payload holds the summary the model sees in place of what was compacted. A token that was
changed, made under another key (another server, a rotated secret) or by another provider
(OpenAI's `gAAAA...`) fails `open_token`; the caller turns that into a 400. Clients must treat
the content as opaque: the format may change with its version tag.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Any

import orjson

from branchwise.core.errors import InvalidRequest

VERSION = "bw1"
SUMMARY_HEADER = "Summary of the conversation so far (compacted):\n\n"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, signed: str) -> bytes:
    return hmac.new(key, signed.encode("ascii"), hashlib.sha256).digest()


def seal(key: bytes, payload: dict[str, Any]) -> str:
    """The `encrypted_content` carrying `payload`, signed with `key`."""
    if not key:
        raise ValueError("no compaction key")
    signed = f"{VERSION}.{_b64(orjson.dumps(payload))}"
    return f"{signed}.{_b64(_mac(key, signed))}"


def open_token(key: bytes, token: str) -> dict[str, Any] | None:
    """The payload of a token this key signed; None for anything else (changed, foreign,
    malformed, another version)."""
    parts = token.split(".")
    if not key or len(parts) != 3 or parts[0] != VERSION or not token.isascii():
        return None
    signed = f"{parts[0]}.{parts[1]}"
    try:
        if not hmac.compare_digest(_mac(key, signed), _unb64(parts[2])):
            return None
        payload = orjson.loads(_unb64(parts[1]))
    except (binascii.Error, ValueError):  # (orjson's JSONDecodeError is a ValueError)
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("summary"), str):
        return None
    return payload


def unverified(param: str) -> InvalidRequest:
    return InvalidRequest(
        "The compaction item's encrypted_content could not be verified: it was not made by this "
        "server's POST /v1/responses/compact, or it was changed. Send compaction items back exactly "
        "as this server returned them.", param=param, code="invalid_encrypted_content")


def chat_message(summary: str) -> dict[str, Any]:
    """What the model sees in place of a compaction item: the summary, as a user turn (a second
    `system` message mid-conversation is refused by many chat templates)."""
    return {"role": "user", "content": SUMMARY_HEADER + summary}
