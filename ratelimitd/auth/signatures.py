"""Signed requests (docs/keys.md): the client's signing function and the verifier.

A key created with `require_signature` has a signing secret. Its client signs every request it
sends to the gateway with `sign_request`, and the gateway forwards the resulting object as the
reserve's `signature`. The value is HMAC-SHA256(secret, canonical string) in hex, over

    v1\\n{timestamp}\\n{nonce}\\n{method}\\n{path}\\n{body_sha256}

The daemon's `SignatureVerifier` checks, in this order: the object's fields (a malformed one
is refused before any work), freshness (the timestamp within `signature_max_age_s` of the
`now` the caller passes), the value (constant-time compare), and last the nonce, which it
stores in Redis with SET NX for twice the window (a signature stays acceptable from
timestamp - max_age to timestamp + max_age of any daemon's clock), so a replay on any daemon is
refused. Only authentic signatures store a nonce: a forger cannot burn a client's nonces.

The daemon cannot see the client's body: the gateway must check `body_sha256` against the raw
body it forwards (`body_sha256()` computes it).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from ratelimitd.errors import RatelimitdError
from ratelimitd.store.connect import RedisClient

VERSION: Final = "v1"
FIELDS: Final = ("timestamp", "nonce", "method", "path", "body_sha256", "value")
NONCE_KEY_PREFIX: Final = "rln:"
MAX_TIMESTAMP: Final = 10**11           # seconds: year 5138; bounds the number's size
_NONCE: Final = re.compile(r"[A-Za-z0-9_.~-]{16,128}")
_METHOD: Final = re.compile(r"[A-Z]{1,16}")
_PATH: Final = re.compile(r"/[\x21-\x7e]{0,2047}")    # printable ASCII, no space or newline
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_VALUE: Final = re.compile(r"[0-9a-fA-F]{64}")

FailureReason = Literal["missing", "malformed", "stale", "bad", "replayed"]


class SignatureError(RatelimitdError):
    """A refused signature. Every reason answers 401 invalid_signature; the message says why
    (and names the field when one is malformed)."""

    status: Final = 401
    code: Final = "invalid_signature"

    def __init__(self, reason: FailureReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class Signature:
    timestamp: int
    nonce: str
    method: str
    path: str
    body_sha256: str
    value: str

    def to_json(self) -> dict[str, Any]:
        return {"timestamp": self.timestamp, "nonce": self.nonce, "method": self.method,
                "path": self.path, "body_sha256": self.body_sha256, "value": self.value}


def body_sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def canonical_string(timestamp: int, nonce: str, method: str, path: str,
                     body_hash: str) -> str:
    return f"{VERSION}\n{timestamp}\n{nonce}\n{method}\n{path}\n{body_hash}"


def _mac(signing_secret: str, canonical: str) -> str:
    return hmac.new(signing_secret.encode(), canonical.encode(), hashlib.sha256).hexdigest()


def sign_request(signing_secret: str, method: str, path: str, body: bytes, *,
                 timestamp: int | None = None, nonce: str | None = None) -> dict[str, Any]:
    """The `signature` object for one request to the gateway: `body` is the raw request body,
    `path` the request's path (with its query, if any). A fresh nonce and the current time
    unless given."""
    signature = Signature(
        timestamp=int(time.time()) if timestamp is None else timestamp,
        nonce=secrets.token_urlsafe(18) if nonce is None else nonce,
        method=method.upper(), path=path, body_sha256=body_sha256(body), value="")
    parse_signature({**signature.to_json(), "value": "0" * 64})  # the client's own mistakes
    canonical = canonical_string(signature.timestamp, signature.nonce, signature.method,
                                 signature.path, signature.body_sha256)
    return {**signature.to_json(), "value": _mac(signing_secret, canonical)}


def parse_signature(raw: object) -> Signature:
    """The forwarded object, checked field by field (SignatureError "malformed" names the
    field)."""
    if raw is None:
        raise SignatureError("missing", "signature: this key requires signed requests; "
                                        "sign each request with its signing secret")
    if not isinstance(raw, Mapping):
        raise SignatureError("malformed", "signature: must be an object")
    for name in raw:
        if name not in FIELDS:
            raise SignatureError("malformed", f"signature.{name}: unknown field (known: "
                                              f"{', '.join(FIELDS)})")
    for name in FIELDS:
        if name not in raw:
            raise SignatureError("malformed", f"signature.{name}: is required")
    timestamp = raw["timestamp"]
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise SignatureError("malformed", "signature.timestamp: must be whole unix seconds")
    if not 0 < timestamp < MAX_TIMESTAMP:
        raise SignatureError("malformed", "signature.timestamp: out of range")
    checks = (("nonce", _NONCE, "16 to 128 of A-Z a-z 0-9 _ . ~ -"),
              ("method", _METHOD, "an upper-case HTTP method"),
              ("path", _PATH, "the request path: '/' then printable ASCII, no spaces"),
              ("body_sha256", _HEX64, "64 lower-case hex digits"),
              ("value", _VALUE, "64 hex digits"))
    for name, pattern, what in checks:
        value = raw[name]
        if not isinstance(value, str) or len(value) > 2048 or not pattern.fullmatch(value):
            raise SignatureError("malformed", f"signature.{name}: must be {what}")
    return Signature(timestamp, raw["nonce"], raw["method"], raw["path"], raw["body_sha256"],
                     raw["value"].lower())


class SignatureVerifier:
    """Verifies forwarded signatures; nonces live in Redis (one slot per key id)."""

    def __init__(self, redis: RedisClient, max_age_s: int) -> None:
        if max_age_s < 0:
            raise ValueError("signature_max_age_s must not be negative")
        self._redis = redis
        self.max_age_s = max_age_s

    async def verify(self, raw: object, signing_secret: str, key_id: str,
                     now_ms: int) -> Signature:
        """The signature if it is well formed, fresh at `now_ms`, authentic and new; else
        SignatureError. Costs one Redis call (the nonce), only for an authentic one."""
        signature = parse_signature(raw)
        skew_s = abs(now_ms / 1000 - signature.timestamp)
        if skew_s > self.max_age_s:
            raise SignatureError("stale", f"signature.timestamp: {skew_s:.0f} s from the "
                                          f"daemon's clock, more than the {self.max_age_s} s "
                                          "allowed; sign each request when it is sent")
        canonical = canonical_string(signature.timestamp, signature.nonce, signature.method,
                                     signature.path, signature.body_sha256)
        if not hmac.compare_digest(_mac(signing_secret, canonical), signature.value):
            raise SignatureError("bad", "signature.value: does not match the request and the "
                                        "key's signing secret")
        stored = await self._redis.set(nonce_key(key_id, signature.nonce), b"1", nx=True,
                                       px=max(1, 2 * self.max_age_s * 1000))
        if not stored:
            raise SignatureError("replayed", "signature.nonce: already used; sign each "
                                             "request with a new nonce")
        return signature


def nonce_key(key_id: str, nonce: str) -> str:
    """Nonces are per key (two keys may pick the same one), in the key's slot."""
    return f"{NONCE_KEY_PREFIX}{{{key_id}}}:{nonce}"
