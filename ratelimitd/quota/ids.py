"""Reservation ids: unguessable, and carrying their primary subject sealed.

An id is `rsv_<rand>.<sealed>`. `rand` names the reservation's records: 144 random bits, or,
for a reserve with an idempotency key, an HMAC of the subject and the key under a secret kept
in Redis (so a retry finds the first reservation, on any daemon, and nobody can predict the id
of someone else's key). `sealed` is the primary subject's tag (where the records live),
encrypted with a keystream of keyed BLAKE2b (secret; rand, block number) and authenticated
with another keyed BLAKE2b of rand and the ciphertext (80 bits), so an id neither shows whom
it belongs to nor can be forged to point at another subject. Both are hashlib's C code.

Ids sealed with HMAC-SHA256 (keystream and tag), as earlier versions made them, are still
read when their tag does not match the BLAKE2b one, so reservations made before an upgrade can
be settled after it.
Every id is accepted in its one canonical spelling only: base64 without padding, whose unused
low bits are zero (a lenient decoder reads several spellings as the same bytes).
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import os
import re
from dataclasses import dataclass, field
from typing import Any, Final

PREFIX: Final = "rsv_"
MAX_CHARS: Final = 1024
# Redis key of the secret every daemon shares (created once, SET NX)
SEAL_REDIS_KEY: Final = "rl:{ratelimitd}:id-seal"
SECRET_BYTES: Final = 32
_RANDOM_BYTES: Final = 18                      # 144 bits
# drawn from the OS this many ids at a time (attempt numbers too): one getrandom per reserve
# was a measurable cost
_RANDOM_BATCH: Final = 455
_MAC_BYTES: Final = 10
_RAND: Final = re.compile(r"[A-Za-z0-9_-]{24}")
_STREAM_BLOCK: Final = 64  # BLAKE2b's largest digest


# base64's urlsafe functions, without their Python layers: binascii and a translation
_TO_URLSAFE: Final = bytes.maketrans(b"+/", b"-_")
_FROM_URLSAFE: Final = bytes.maketrans(b"-_", b"+/")


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    """Raises ValueError (binascii.Error is one) for what does not decode."""
    padded = (text + "=" * (-len(text) % 4)).encode("ascii")
    return binascii.a2b_base64(padded.translate(_FROM_URLSAFE))


def _xor(data: bytes, stream: bytes) -> bytes:
    return (int.from_bytes(data) ^ int.from_bytes(stream)).to_bytes(len(data))


@dataclass(slots=True)
class ReservationIds:
    secret: bytes
    _pool: bytes = field(default=b"", repr=False)
    _used: int = field(default=0, repr=False)  # bytes of the pool given out
    # the keyed hashes with the secret absorbed once; each id hashes a copy
    _stream: Any = field(init=False, repr=False)
    _tag: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._stream = hashlib.blake2b(key=self.secret, digest_size=_STREAM_BLOCK,
                                       person=b"rsv-id-seal")
        self._tag = hashlib.blake2b(key=self.secret, digest_size=_MAC_BYTES,
                                    person=b"rsv-id-tag")

    def _random_bytes(self, count: int) -> bytes:
        start = self._used
        if start + count > len(self._pool):
            self._pool, start = os.urandom(_RANDOM_BYTES * _RANDOM_BATCH), 0
        self._used = start + count
        return self._pool[start:start + count]

    def random(self) -> str:
        """A fresh random part."""
        return _b64(self._random_bytes(_RANDOM_BYTES))

    def for_key(self, tag: str, idempotency_key: str) -> str:
        """The random part of the reservation an idempotency key names, for one subject."""
        digest = hmac.digest(self.secret, f"idem\0{tag}\0{idempotency_key}".encode(), "sha256")
        return _b64(digest[:_RANDOM_BYTES])

    def attempt(self) -> int:
        """A random whole number below 2^52 naming one reserve attempt (a double holds it)."""
        return int.from_bytes(self._random_bytes(7)) >> 4 or 1

    def make(self, tag: str, rand: str) -> str:
        plain = tag.encode()
        sealed = _xor(plain, self._keystream(rand, len(plain)))
        return f"{PREFIX}{rand}.{_b64(sealed + self._mac(rand, sealed))}"

    def parse(self, rid: str) -> tuple[str, str] | None:
        """rid -> (random part, primary subject tag), or None when it is not one of ours (or
        not spelled as we spell it)."""
        if not rid.startswith(PREFIX) or len(rid) > MAX_CHARS:
            return None
        rand, _, rest = rid[len(PREFIX):].partition(".")
        if not _RAND.fullmatch(rand):
            return None
        try:
            blob = _unb64(rest)
        except (ValueError, binascii.Error):
            return None
        if _b64(blob) != rest:  # padding, stray characters or non-zero unused bits
            return None
        sealed, mac = blob[:-_MAC_BYTES], blob[-_MAC_BYTES:]
        if not sealed:
            return None
        if hmac.compare_digest(mac, self._mac(rand, sealed)):
            plain = _xor(sealed, self._keystream(rand, len(sealed)))
        elif hmac.compare_digest(mac, self._legacy_mac(rand, sealed)):
            plain = _xor(sealed, self._legacy_keystream(rand, len(sealed)))
        else:
            return None
        try:
            return rand, plain.decode()
        except UnicodeDecodeError:
            return None

    def _keystream(self, rand: str, length: int) -> bytes:
        start = rand.encode()
        if length <= _STREAM_BLOCK:  # one block: every tag of a realistic length
            block = self._stream.copy()
            block.update(start + b"\0\0")  # block number 0, as i.to_bytes(2) below
            return bytes(block.digest()[:length])
        blocks = []
        for i in range((length + _STREAM_BLOCK - 1) // _STREAM_BLOCK):
            block = self._stream.copy()
            block.update(start + i.to_bytes(2))
            blocks.append(block.digest())
        return b"".join(blocks)[:length]

    def _mac(self, rand: str, sealed: bytes) -> bytes:
        tag = self._tag.copy()
        tag.update(rand.encode() + sealed)  # rand has a fixed length: no separator needed
        return bytes(tag.digest())

    def _legacy_keystream(self, rand: str, length: int) -> bytes:
        blocks = [hmac.digest(self.secret, f"seal\0{rand}\0{i}".encode(), "sha256")
                  for i in range((length + 31) // 32)]
        return b"".join(blocks)[:length]

    def _legacy_mac(self, rand: str, sealed: bytes) -> bytes:
        return hmac.digest(self.secret, b"mac\0" + rand.encode() + b"\0" + sealed,
                           "sha256")[:_MAC_BYTES]
