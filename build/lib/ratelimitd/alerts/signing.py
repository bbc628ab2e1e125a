"""Webhook signatures: the header the daemon sends, and the check a receiver runs.

`X-Ratelimitd-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`.
The timestamp is signed with the body, so a receiver that refuses old timestamps refuses
replays of a captured request too; the alert id in the body lets it drop the at-least-once
duplicates that remain. A receiver rotating secrets may see several `v1=` entries: any one
that matches is enough (the daemon sends one).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

SIGNATURE_HEADER: Final = "X-Ratelimitd-Signature"
MAX_HEADER_CHARS: Final = 1024  # a header longer than a few signatures is not ours


def signature(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256(secret, "<timestamp>.<body>")."""
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, b"%d." % timestamp + body, hashlib.sha256).hexdigest()


def signature_header(secret: str | bytes, timestamp: int, body: bytes) -> str:
    """The header's value for `body` sent at `timestamp` (unix seconds)."""
    return f"t={timestamp},v1={signature(secret, timestamp, body)}"


def verify_webhook_signature(secret: str | bytes, header: str | None, body: bytes, now: float,
                             tolerance_s: float = 300) -> bool:
    """True when `header` signs exactly `body` with `secret`, at a time within `tolerance_s`
    of `now` (unix seconds, either way). Malformed, stale, future or wrong: False.

    Pass the raw body as received, before any JSON parsing: re-encoding changes the bytes.
    """
    if not header or len(header) > MAX_HEADER_CHARS:
        return False
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            return False
        if name == "t":
            digits = value.isascii() and value.isdigit() and len(value) <= 12
            if timestamp is not None or not digits:
                return False
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or not candidates or abs(now - timestamp) > tolerance_s:
        return False
    expected = signature(secret, timestamp, body).encode()
    matched = False
    for candidate in candidates:  # every one compared: timing does not tell which matched
        matched |= hmac.compare_digest(expected, candidate.encode())
    return matched
