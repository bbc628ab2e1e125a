"""Reservation ids: unguessable, and carrying their primary subject sealed.

An id is `rsv_<rand>.<sealed>`. `rand` names the reservation's records: 144 random bits, or,
for a reserve with an idempotency key, an HMAC of the subject and the key under a secret kept
in Redis (so a retry finds the first reservation, on any daemon, and nobody can predict the id
of someone else's key). `sealed` is the primary subject's tag (where the records live),
encrypted with a keystream of HMAC-SHA256(secret, rand, counter) and authenticated with a
truncated HMAC, so an id neither shows whom it belongs to nor can be forged to point at
another subject.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field
from typing import Final

PREFIX: Final = "rsv_"
MAX_CHARS: Final = 1024
# Redis key of the secret every daemon shares (created once, SET NX)
SEAL_REDIS_KEY: Final = "rl:{ratelimitd}:id-seal"
SECRET_BYTES: Final = 32
_RANDOM_BYTES: Final = 18                      # 144 bits
# drawn from the OS this many ids at a time: one getrandom per reserve was a measurable cost
_RANDOM_BATCH: Final = 455
_MAC_BYTES: Final = 10
_RAND: Final = re.compile(r"[A-Za-z0-9_-]{24}")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(slots=True)
class ReservationIds:
    secret: bytes
    _pool: bytes = field(default=b"", repr=False)

    def random(self) -> str:
        """A fresh random part."""
        if len(self._pool) < _RANDOM_BYTES:
            self._pool = os.urandom(_RANDOM_BYTES * _RANDOM_BATCH)
        chunk, self._pool = self._pool[:_RANDOM_BYTES], self._pool[_RANDOM_BYTES:]
        return _b64(chunk)

    def for_key(self, tag: str, idempotency_key: str) -> str:
        """The random part of the reservation an idempotency key names, for one subject."""
        digest = hmac.new(self.secret, f"idem\0{tag}\0{idempotency_key}".encode(),
                          hashlib.sha256).digest()
        return _b64(digest[:_RANDOM_BYTES])

    def attempt(self) -> int:
        """A random whole number below 2^52 naming one reserve attempt (a double holds it)."""
        return int.from_bytes(os.urandom(7)) >> 4 or 1

    def make(self, tag: str, rand: str) -> str:
        plain = tag.encode()
        sealed = bytes(a ^ b for a, b in zip(plain, self._keystream(rand, len(plain)),
                                             strict=True))
        return f"{PREFIX}{rand}.{_b64(sealed + self._mac(rand, sealed))}"

    def parse(self, rid: str) -> tuple[str, str] | None:
        """rid -> (random part, primary subject tag), or None when it is not one of ours."""
        if not rid.startswith(PREFIX) or len(rid) > MAX_CHARS:
            return None
        rand, _, rest = rid[len(PREFIX):].partition(".")
        if not _RAND.fullmatch(rand):
            return None
        try:
            blob = _unb64(rest)
        except (ValueError, binascii.Error):
            return None
        sealed, mac = blob[:-_MAC_BYTES], blob[-_MAC_BYTES:]
        if not sealed or not hmac.compare_digest(mac, self._mac(rand, sealed)):
            return None
        plain = bytes(a ^ b for a, b in zip(sealed, self._keystream(rand, len(sealed)),
                                            strict=True))
        try:
            return rand, plain.decode()
        except UnicodeDecodeError:
            return None

    def _keystream(self, rand: str, length: int) -> bytes:
        blocks = [hmac.new(self.secret, f"seal\0{rand}\0{i}".encode(), hashlib.sha256).digest()
                  for i in range((length + 31) // 32)]
        return b"".join(blocks)[:length]

    def _mac(self, rand: str, sealed: bytes) -> bytes:
        return hmac.new(self.secret, b"mac\0" + rand.encode() + b"\0" + sealed,
                        hashlib.sha256).digest()[:_MAC_BYTES]
