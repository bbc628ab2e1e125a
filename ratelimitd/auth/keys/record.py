"""A key's record in Redis: the hash `rlk:{<key id>}` and its fields (store.py's docstring
lists them), as the scripts read them (lua/scripts/key_read.lua, key_resolve.lua)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

RECORD_PREFIX: Final = "rlk:"
# a record's fields in the order key_read.lua and key_resolve.lua read them
RECORD_FIELDS: Final = ("h", "u", "o", "t", "c", "e", "r", "rt", "rf", "sg", "s")


def record_key(key_id: str) -> str:
    return f"{RECORD_PREFIX}{{{key_id}}}"


@dataclass(frozen=True, slots=True)
class Record:
    key_hash: str
    user: str
    org: str
    tier: str
    created_ms: int
    expires_ms: int
    revoked_ms: int
    rotated_to: str
    rotated_from: str
    require_signature: bool
    seed: str

    @classmethod
    def parse(cls, values: Sequence[bytes | None]) -> Record | None:
        if not values or values[0] is None:
            return None
        h, u, o, t, c, e, r, rt, rf, sg, s = (v.decode() if v is not None else ""
                                              for v in values)
        return cls(h, u, o, t, int(c or 0), int(e or 0), int(r or 0), rt, rf, sg == "1", s)
