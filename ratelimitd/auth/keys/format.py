"""The API key format: `rlk_` + 30 random base62 characters + a 6-character base62 CRC32.

Like GitHub's tokens: the prefix lets secret scanners find leaked keys (the regex is
`KEY_PATTERN`), the 30 random characters carry 178 bits from `secrets`, and the checksum lets a
mistyped or made-up key be refused without a Redis call. The checksum is public (anyone can
compute it): it detects mistakes, it is not a secret.
"""

from __future__ import annotations

import hmac
import re
import secrets
import zlib
from typing import Final

BASE62: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
KEY_PREFIX: Final = "rlk_"
RANDOM_CHARS: Final = 30            # 30 x log2(62) = 178.6 random bits
CHECKSUM_CHARS: Final = 6           # 62^6 > 2^32: a whole CRC32
KEY_CHARS: Final = len(KEY_PREFIX) + RANDOM_CHARS + CHECKSUM_CHARS
# for secret scanners (and our own log scrubbing)
KEY_PATTERN: Final = re.compile(rf"\b{KEY_PREFIX}[0-9A-Za-z]{{{RANDOM_CHARS + CHECKSUM_CHARS}}}\b")
_KEY_SHAPE: Final = re.compile(rf"{KEY_PREFIX}[0-9A-Za-z]{{{RANDOM_CHARS + CHECKSUM_CHARS}}}")


def base62(number: int, width: int) -> str:
    """`number` in base62, left-padded with '0' to `width` characters."""
    digits = []
    while number:
        number, rest = divmod(number, 62)
        digits.append(BASE62[rest])
    text = "".join(reversed(digits))
    if len(text) > width:
        raise ValueError(f"{number} needs more than {width} base62 digits")
    return text.rjust(width, "0")


def _checksum(body: str) -> str:
    return base62(zlib.crc32(body.encode()), CHECKSUM_CHARS)


def generate_api_key() -> str:
    """A new key; shown to its owner once, never stored."""
    body = KEY_PREFIX + "".join(secrets.choice(BASE62) for _ in range(RANDOM_CHARS))
    return body + _checksum(body)


def well_formed(api_key: object) -> bool:
    """Whether `api_key` has our shape and a matching checksum (no Redis involved)."""
    if not isinstance(api_key, str) or len(api_key) != KEY_CHARS:
        return False
    if not _KEY_SHAPE.fullmatch(api_key):
        return False
    body, check = api_key[:-CHECKSUM_CHARS], api_key[-CHECKSUM_CHARS:]
    return hmac.compare_digest(_checksum(body), check)
