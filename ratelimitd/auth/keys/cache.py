"""The per-process resolve cache: key records for at most `ttl_s` (1 s), bounded in size.

A revocation must reach every daemon within 1 s. Two mechanisms, either enough alone:
- An entry is born when its fetch is *sent* (before Redis read the record), so a cached
  record never outlives a revocation by more than `ttl_s`.
- The daemon that revokes or rotates publishes the key id; every KeyStore listening drops its
  entry at once (milliseconds), and a fetch in flight across an invalidation is used for its own
  request but not cached (the epoch check), so it cannot bring the old record back.

The store caches only records of keys not revoked: a flood of made-up keys would otherwise
evict the real ones, and a revoked key answers in the time of an unknown one.
Eviction is by age (entries are re-inserted on refresh, so the oldest is the first to expire).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

DEFAULT_TTL_S: Final = 1.0
DEFAULT_MAX_ENTRIES: Final = 10_000

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Entry(Generic[T]):
    value: T
    redis_now_ms: int        # Redis time when the record was read
    born: float              # monotonic seconds when the fetch was sent


class ResolveCache(Generic[T]):
    def __init__(self, ttl_s: float = DEFAULT_TTL_S, max_entries: int = DEFAULT_MAX_ENTRIES,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if not 0 <= ttl_s <= 1.0:
            raise ValueError("the key cache keeps an entry at most 1 s (revocations must reach "
                             "every daemon within 1 s)")
        if max_entries < 1:
            raise ValueError("the key cache needs room for at least one entry")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.monotonic = monotonic
        # bumped by every invalidation: a fetch that straddles one is not cached
        self.epoch = 0
        self._entries: OrderedDict[str, Entry[T]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Entry[T] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.monotonic() - entry.born >= self.ttl_s:
            del self._entries[key]
            return None
        return entry

    def put(self, key: str, entry: Entry[T], epoch: int) -> None:
        """Caches `entry` unless an invalidation happened since its fetch began (`epoch`)."""
        if epoch != self.epoch or self.ttl_s == 0:
            return
        self._entries.pop(key, None)
        while len(self._entries) >= self.max_entries:
            self._entries.popitem(last=False)
        self._entries[key] = entry

    def invalidate(self, key: str) -> None:
        self.epoch += 1
        self._entries.pop(key, None)

    def clear(self) -> None:
        self.epoch += 1
        self._entries.clear()
