"""Blocks: a subject (scope, id) refused for a while, with a reason; manual or automatic.

Where a block lives, and why there: in the subject's own quota hash `rl:{<scope>:<id>}` (the
one the reserve's Lua already reads for the subject's limits), field `b`, so the reserve sees
a block inside the call it makes anyway: no extra Redis round trip on the hot path. Layout of
`b` (documented for the Lua side in lua/block.lua; written by lua/scripts/block_write.lua):

    wire.DOUBLE (a little-endian double): the block's end, ms (Redis TIME or the test clock)
    then the reason, UTF-8

`b` cannot collide with limit state: limit fields are 8 hex characters (`lid`), `lid:<n>` for
sub-buckets, and `x` (the hash's expiry as the engine last set it). Writing a block keeps the
hash alive at least until the block ends, and raises `x` to match, so the engine's own
PEXPIRE (which it only makes when `x` is too short for its limits) never cuts a block short.

Listing needs an index, since blocks are spread over every slot: the sorted set `rlb:index`
(member: the subject's tag, score: the block's end), pruned of ended blocks on every list. The
index is written after the block (a failure between the two leaves a block that works but is
not listed; the call raises, so an admin retries) and is only a hint: list reads each block
back from its hash.
"""

from __future__ import annotations

import asyncio
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ratelimitd.abuse.ip import (
    DEFAULT_IPV4_PREFIX,
    DEFAULT_IPV6_PREFIX,
    InvalidIpError,
    canonical_ip,
    check_prefix_bits,
    ip_prefix,
    parse_ip,
)
from ratelimitd.errors import RatelimitdError
from ratelimitd.policy import BUILTIN_SCOPES, Subject
from ratelimitd.quota import wire
from ratelimitd.quota.scripts import script_source
from ratelimitd.store.connect import RedisClient
from ratelimitd.store.failures import DRIVER_FAILURES, store_error

BLOCK_FIELD: Final = "b"
INDEX_KEY: Final = "rlb:index"

MAX_TTL_S: Final = 365 * 86_400
MAX_REASON_CHARS: Final = 200
MAX_ID_CHARS: Final = 256
DEFAULT_LIST_LIMIT: Final = 1000
_SCOPE: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_ESCAPE: Final = re.compile(r"%(25|7B|7D)")

class BlockInputError(RatelimitdError, ValueError):
    """A bad argument to a block operation; `field` names it (answer 400)."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Block:
    subject: Subject
    ends_at_ms: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"scope": self.subject.scope, "id": self.subject.id,
                "expires_at_ms": self.ends_at_ms, "reason": self.reason}


def block_script(name: str) -> str:
    """Script `name` with the shared block writing (block_write.lua: block_end, set_block)."""
    return script_source(name, clock=True, shared=("block_write",), formats=(wire.DOUBLE,))


def subject_key(subject: Subject) -> str:
    """The subject's quota hash, as the engine names it."""
    return f"rl:{{{subject.tag}}}"


def parse_block(subject: Subject, raw: bytes | None, now_ms: int) -> Block | None:
    """The block stored in `b`, if it still holds at `now_ms` (Python twin of block.lua)."""
    if raw is None or len(raw) < wire.DOUBLE.size:
        return None
    (ends,) = struct.unpack_from(wire.DOUBLE.python, raw)
    if ends <= now_ms:
        return None
    return Block(subject, int(ends), raw[wire.DOUBLE.size:].decode(errors="replace"))


def subject_from_tag(tag: str) -> Subject:
    scope, _, safe = tag.partition(":")
    ident = _ESCAPE.sub(lambda m: {"25": "%", "7B": "{", "7D": "}"}[m.group(1)], safe)
    return Subject(scope, ident)


class BlockStore:
    """Adds, removes, reads and lists blocks. `clock`: ms for tests (None: Redis TIME; use the
    engine's clock, since the reserve compares the block's end with its own `now`).
    `ipv4_bits`/`ipv6_bits`: the ip_prefix scope's lengths, so a manual ip_prefix block names a
    network the reserve will look up."""

    def __init__(self, redis: RedisClient, *, clock: Callable[[], int] | None = None,
                 ipv4_bits: int = DEFAULT_IPV4_PREFIX,
                 ipv6_bits: int = DEFAULT_IPV6_PREFIX) -> None:
        check_prefix_bits(ipv4_bits, ipv6_bits)
        self._redis = redis
        self._clock = clock
        self.ipv4_bits = ipv4_bits
        self.ipv6_bits = ipv6_bits
        self._add = redis.register_script(block_script("block_add"))
        self._read = redis.register_script(script_source("block_read", clock=True))
        self._list = redis.register_script(script_source("block_list", clock=True))

    def override(self) -> int:
        """The clock argument of the guard's scripts (0: Redis TIME)."""
        return self._clock() if self._clock else 0

    def subject(self, scope: object, ident: object) -> Subject:
        """A checked subject, its id in the form the reserve uses (canonical address,
        network of the configured length)."""
        if not isinstance(scope, str) or not (scope in BUILTIN_SCOPES or _SCOPE.fullmatch(scope)):
            raise BlockInputError("scope", f"must be one of {', '.join(BUILTIN_SCOPES)} or an "
                                           "attribute name (lowercase letters, digits, '_')")
        if not isinstance(ident, str) or not ident:
            raise BlockInputError("id", "must be a non-empty string")
        if len(ident) > MAX_ID_CHARS or _CONTROL.search(ident):
            raise BlockInputError("id", f"at most {MAX_ID_CHARS} characters, no control "
                                        "characters")
        try:
            if scope == "ip":
                return Subject("ip", canonical_ip(ident))
            if scope == "ip_prefix":
                return Subject("ip_prefix", self._network(ident))
        except InvalidIpError as exc:
            raise BlockInputError("id", str(exc).replace("attributes.ip: ", "")) from exc
        if scope == "global" and ident != "*":
            raise BlockInputError("id", "the global scope's id is *")
        return Subject(scope, ident)

    def _network(self, text: str) -> str:
        """An address, or a network of the configured length, as that network."""
        address, slash, bits = text.partition("/")
        version = parse_ip(address).version
        want = self.ipv4_bits if version == 4 else self.ipv6_bits
        network = ip_prefix(address, self.ipv4_bits, self.ipv6_bits)
        if slash and bits != str(want):
            raise InvalidIpError(f"attributes.ip: ip_prefix ids are /{want} networks here "
                                 f"([abuse] ipv{version}_prefix), like {network}")
        return network

    async def add(self, subject: Subject, ttl_s: object, reason: object) -> Block:
        """Blocks `subject` for `ttl_s` from now, replacing any block it had."""
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or not 1 <= ttl_s <= MAX_TTL_S:
            raise BlockInputError("ttl_s", f"must be a whole number from 1 to {MAX_TTL_S}")
        if (not isinstance(reason, str) or not reason or len(reason) > MAX_REASON_CHARS
                or _CONTROL.search(reason)):
            raise BlockInputError("reason", f"must be 1 to {MAX_REASON_CHARS} characters, no "
                                            "control characters")
        _now, ends = await self._add(keys=[subject_key(subject)],
                                     args=[self.override(), ttl_s * 1000, reason])
        await self.index(subject, int(ends))
        return Block(subject, int(ends), reason)

    async def index(self, subject: Subject, ends_at_ms: int) -> None:
        """Lists a block written by a script (add, the auth-failure guard, an anomaly).
        Raises StoreUnavailable when Redis fails: the block holds, only its listing is lost."""
        try:
            await self._redis.zadd(INDEX_KEY, {subject.tag: ends_at_ms})
        except DRIVER_FAILURES as exc:
            raise store_error(exc) from exc

    async def remove(self, subject: Subject) -> bool:
        """Lifts the subject's block; False when it had none."""
        removed = await self._redis.hdel(subject_key(subject), BLOCK_FIELD)
        await self._redis.zrem(INDEX_KEY, subject.tag)
        return bool(removed)

    async def get(self, subject: Subject) -> Block | None:
        """The subject's block, if it holds now."""
        now, raw = await self._read(keys=[subject_key(subject)], args=[self.override()])
        return parse_block(subject, raw, int(now))

    async def check(self, subjects: Sequence[Subject]) -> Block | None:
        """The first of `subjects` that is blocked (their reads run concurrently: one round
        trip of latency). For admin tools and tests: the reserve reads `b` in its own Lua."""
        blocks = await asyncio.gather(*(self.get(s) for s in subjects))
        return next((b for b in blocks if b is not None), None)

    async def list(self, limit: int = DEFAULT_LIST_LIMIT) -> list[Block]:
        """The blocks in force, soonest to end first, at most `limit`."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000:
            raise BlockInputError("limit", "must be a whole number from 1 to 10000")
        _now, members = await self._list(keys=[INDEX_KEY], args=[self.override(), limit])
        subjects = [subject_from_tag(m.decode()) for m in members]
        blocks = await asyncio.gather(*(self.get(s) for s in subjects))
        found = [b for b in blocks if b is not None]
        return sorted(found, key=lambda b: (b.ends_at_ms, b.subject.tag))
