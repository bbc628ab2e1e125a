"""Credential stuffing: failed key lookups and signatures counted per client address, then a
block.

Every refused `api_key` (malformed, unknown, revoked, expired) and every refused signature
(access/caller.py) from a request with `attributes.ip` is one failure of that address (an IPv6
address counts for its network: see ip.py). Failures are kept in a sorted set next to the
subject's quota hash (same hash slot: `rl:{ip:<addr>}:af`), an exact sliding window of
WINDOW_MS. One script per failure prunes, adds, counts and, past `auth_failures_per_ip`,
writes the block into the subject's hash (as blocks.py does) and drops the count, all
atomically, so daemons sharing Redis count together and the set never holds more than
threshold + 1 entries. While the address is blocked a
failure is not counted (nothing grows during an attack). The block then stops every reserve
from that address, valid keys included, on every daemon (the reserve reads `b`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Final

from ratelimitd.abuse.blocks import Block, BlockStore, block_script, subject_key
from ratelimitd.abuse.ip import DEFAULT_IPV6_PREFIX, auth_failure_subject
from ratelimitd.config import AbuseConfig
from ratelimitd.policy import Subject
from ratelimitd.store.connect import RedisClient

WINDOW_MS: Final = 600_000

@dataclass(frozen=True, slots=True)
class FailureOutcome:
    subject: Subject
    failures: int                 # in the window, this one included; 0 when blocked already
    block: Block | None           # the subject's block, when it is blocked
    newly_blocked: bool


class AuthFailureGuard:
    """Counts failed key lookups and signatures per address; `threshold` 0 turns the defence
    off."""

    def __init__(self, redis: RedisClient, blocks: BlockStore, threshold: int, block_s: int,
                 ipv6_bits: int = DEFAULT_IPV6_PREFIX) -> None:
        if threshold < 0 or block_s < 1:
            raise ValueError("auth_failures_per_ip must be >= 0 and block_s >= 1")
        self._blocks = blocks
        self.threshold = threshold
        self.block_s = block_s
        self.ipv6_bits = ipv6_bits
        self._failure = redis.register_script(block_script("auth_failure"))

    @classmethod
    def from_config(cls, redis: RedisClient, blocks: BlockStore,
                    abuse: AbuseConfig) -> AuthFailureGuard:
        return cls(redis, blocks, abuse.auth_failures_per_ip, abuse.block_s, blocks.ipv6_bits)

    async def record_failure(self, ip: str) -> FailureOutcome:
        """Counts one failed lookup or signature from `ip` (raises InvalidIpError for a bad
        address)."""
        subject = auth_failure_subject(ip, self.ipv6_bits)
        if self.threshold == 0:
            return FailureOutcome(subject, 0, None, False)
        key = subject_key(subject)
        reason = (f"more than {self.threshold} failed API key lookups or signatures in "
                  f"{WINDOW_MS // 60_000} minutes")
        status, _now, ends, failures = await self._failure(
            keys=[key, f"{key}:af"],
            args=[self._blocks.override(), WINDOW_MS, self.threshold, self.block_s * 1000,
                  reason, secrets.token_hex(8)])
        block = Block(subject, int(ends), reason) if status in (1, 2) else None
        if status == 1:
            await self._blocks.index(subject, int(ends))
        return FailureOutcome(subject, int(failures), block, status == 1)
