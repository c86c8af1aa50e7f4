"""Standard Webhooks signing (https://www.standardwebhooks.com).

Receivers verify our calls with any Standard Webhooks library, so the format is fixed by the spec:
`webhook-signature: v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, keyed with the base64-decoded part of a
`whsec_…` secret. Several space-separated signatures are allowed; we send one per active secret so a tenant can
rotate: during the overlap window receivers holding either the new or the old secret accept the call.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets as _secrets
import time
from collections.abc import Sequence

SECRET_PREFIX = "whsec_"


def generate_secret(nbytes: int = 32) -> str:
    """A new tenant secret: `whsec_` + base64 of `nbytes` random bytes (the spec asks for 24 to 64)."""
    if not 24 <= nbytes <= 64:
        raise ValueError("a webhook secret holds 24 to 64 random bytes")
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(nbytes)).decode("ascii")


def _key(secret: str) -> bytes:
    """The HMAC key of a secret. Padding is optional, as in the reference libraries."""
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("webhook secret is not valid base64 after the whsec_ prefix") from exc
    if not key:
        raise ValueError("webhook secret is empty")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64>` signature of `{msg_id}.{timestamp}.{body}`; the body is signed exactly as sent."""
    signed = f"{msg_id}.{int(timestamp)}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def signature_header(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: one signature per secret (current first), space-separated."""
    unique = list(dict.fromkeys(secrets))
    if not unique:
        raise ValueError("at least one webhook secret is needed to sign")
    return " ".join(sign(s, msg_id, timestamp, body) for s in unique)


def build_headers(msg_id: str, body: bytes, secrets: Sequence[str], now: float | None = None) -> dict[str, str]:
    """Headers for one delivery attempt.

    `msg_id` must be the event's id, identical on every retry, so receivers can deduplicate (delivery is
    at-least-once). Build fresh headers for every attempt: receivers reject timestamps more than about five
    minutes from their clock, so a retry hours later must carry a new timestamp and signature.
    """
    timestamp = int(time.time() if now is None else now)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(secrets, msg_id, timestamp, body),
        "content-type": "application/json",
    }
