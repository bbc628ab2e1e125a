"""KeyStore: API keys in Redis, stored only as HMACs, resolved in at most one round trip.

Layout: one Redis hash per key, `rlk:{<key id>}` (its own hash slot, so every operation on a
key is one atomic script on one slot, on a standalone Redis or a cluster). The key id is an
HMAC of the key under the pepper (pepper.Pepper.key_id), so a resolve goes from the key
straight to its record: one script call that reads the record and Redis' clock and checks the
key's hash. Fields:

  h   HMAC-SHA256(pepper, key), hex: checked on every resolve (in the script on a miss, with
      hmac.compare_digest on a cache hit)
  u o t   user, org ('' = none), tier
  c e r   created, expires (0 = never), revoked (0 = not) in Redis ms
  rt rf   rotated to / rotated from (key ids, '' = none)
  sg s    requires signed requests ('1'/'0'); the random seed of the signing secret, which is
          HMAC(pepper, "sign", key id, seed) and so never stored

A record outlives its key by RETENTION_MS (so `show` and "expired"/"revoked" answers last a
month), then goes. Expiry decisions use Redis time (TIME in the script; on a cache hit the time
read with the record plus the time since) or the clock a test passes, never the daemon's clock.

Rotation makes a new key (a new id, the old one's user, org, tier, signature requirement and a
new signing secret), then marks the old record rotated-to the new id with its expiry cut to
now + grace, atomically on the old key's slot; if that refuses (revoked, expired or rotated
meanwhile) the new record is deleted again. Revocation and rotation publish the key id on
INVALIDATE_CHANNEL so every daemon's cache drops it (invalidation.py, cache.py).

The record's layout is record.py's, the answers results.py's, the errors errors.py's.

Resolve does the same work whatever is wrong with a key (see `KeyStore.resolve`).
"""

from __future__ import annotations

import asyncio
import hmac
import re
import secrets
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from typing import Final

from ratelimitd.auth.keys.cache import DEFAULT_MAX_ENTRIES, DEFAULT_TTL_S, Entry, ResolveCache
from ratelimitd.auth.keys.errors import KeyInputError, KeyNotFoundError, KeyStateError
from ratelimitd.auth.keys.format import generate_api_key, well_formed
from ratelimitd.auth.keys.invalidation import Invalidations
from ratelimitd.auth.keys.pepper import KEY_ID_CHARS, KEY_ID_PREFIX, Pepper
from ratelimitd.auth.keys.record import Record, record_key
from ratelimitd.auth.keys.results import (
    CreatedKey,
    FailureReason,
    KeyFailure,
    KeyInfo,
    KeyPolicy,
    KeyState,
    KeyWarning,
    ResolvedKey,
    RotatedKey,
)
from ratelimitd.quota.scripts import script_source
from ratelimitd.store.connect import RedisClient

DEFAULT_POLICY: Final = KeyPolicy()
DAY_MS: Final = 86_400_000
RETENTION_MS: Final = 30 * DAY_MS
MAX_EXPIRES_IN_DAYS: Final = 36_500
MAX_GRACE_S: Final = 365 * 86_400
MAX_ID_CHARS: Final = 256
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_KEY_ID: Final = re.compile(rf"{KEY_ID_PREFIX}[0-9A-Za-z]{{{KEY_ID_CHARS}}}")
# A resolve of a malformed key hashes this instead (same length, same cost) and compares
# against a digest no record has.
_STAND_IN_KEY: Final = "rlk_" + "0" * 36
_NO_DIGEST: Final = "0" * 64


class KeyStore:
    """API keys: create, rotate, revoke, show (admin) and resolve (every api_key reserve).

    `clock`: ms for tests; None uses Redis TIME. `known_tiers`: when given, create refuses
    other tiers. Call `start()` to listen for other daemons' revocations (without it the cache
    still forgets every entry within `cache_ttl_s`), `close()` to stop.
    """

    def __init__(self, redis: RedisClient, pepper: Pepper, policy: KeyPolicy = DEFAULT_POLICY, *,
                 clock: Callable[[], int] | None = None, cache_ttl_s: float = DEFAULT_TTL_S,
                 cache_size: int = DEFAULT_MAX_ENTRIES,
                 known_tiers: Collection[str] | None = None) -> None:
        self._redis = redis
        self._pepper = pepper
        self.policy = policy
        self._clock = clock
        self._known_tiers = frozenset(known_tiers) if known_tiers is not None else None
        self.cache: ResolveCache[Record] = ResolveCache(cache_ttl_s, cache_size)
        self._inflight: dict[str, asyncio.Future[Entry[Record] | FailureReason]] = {}
        self._read = redis.register_script(script_source("key_read", clock=True))
        self._resolve = redis.register_script(script_source("key_resolve", clock=True))
        self._create_script = redis.register_script(script_source("key_create", clock=True))
        self._rotate_script = redis.register_script(script_source("key_rotate", clock=True))
        self._revoke_script = redis.register_script(script_source("key_revoke", clock=True))
        self._invalidations = Invalidations(redis, self.cache)
        self.subscribed = self._invalidations.subscribed

    # --- lifecycle of the invalidation listener ---

    async def start(self) -> None:
        """Listens for revocations and rotations published by any daemon; returns once
        subscribed (or keeps trying in the background if Redis is down)."""
        await self._invalidations.start()

    async def aclose(self) -> None:
        await self._invalidations.aclose()

    # --- resolve (hot path) ---

    async def resolve(self, api_key: object) -> ResolvedKey | KeyFailure:
        """The key's identity, or why it is refused.

        A malformed key (wrong shape or checksum) is refused without a Redis call. Every key
        costs the same two HMACs (a malformed one hashes a stand-in of the same length). A
        well-formed key costs one Redis round trip on a cache miss, none on a hit; unknown and
        revoked keys are never cached and get replies of the same size, so they take the same
        time (bench/keys_bench.py measures both). The format and its
        checksum are public, so telling a malformed key from a well-formed one by time tells
        a prober nothing it did not know.
        """
        ok = well_formed(api_key)
        text = api_key if ok and isinstance(api_key, str) else _STAND_IN_KEY
        key_id = self._pepper.key_id(text)
        digest = self._pepper.key_hash(text)
        if not ok:
            hmac.compare_digest(digest, _NO_DIGEST)
            return KeyFailure("malformed")
        entry: Entry[Record] | FailureReason | None = self.cache.get(key_id)
        if entry is None:
            entry = await self._fetch(key_id, digest)
        if isinstance(entry, str):
            hmac.compare_digest(digest, _NO_DIGEST)
            return KeyFailure(entry)
        record = entry.value
        if not hmac.compare_digest(digest, record.key_hash):
            return KeyFailure("unknown")
        now = self._clock() if self._clock else (
            entry.redis_now_ms + int((self.cache.monotonic() - entry.born) * 1000))
        return self._decide(key_id, record, now)

    async def _fetch(self, key_id: str, digest: str) -> Entry[Record] | FailureReason:
        """The live record from Redis, or why there is none; concurrent misses of one key
        share one call. The call runs as its own task, so a caller that gives up (a timeout)
        does not fail the others."""
        task = self._inflight.get(key_id)
        if task is None:
            task = asyncio.ensure_future(
                self._load(key_id, digest, self.cache.epoch, self.cache.monotonic()))
            self._inflight[key_id] = task
            task.add_done_callback(lambda _: self._inflight.pop(key_id, None))
        return await asyncio.shield(task)

    async def _load(self, key_id: str, digest: str, epoch: int,
                    born: float) -> Entry[Record] | FailureReason:
        """epoch, born: the cache's epoch and the time when the miss happened."""
        reply = await self._resolve(keys=[record_key(key_id)],
                                    args=[self._override(), digest])
        if reply[1] != 1:
            # revoked keys are not cached either, like unknown ones: a cached answer is
            # faster, and would tell a prober which keys once existed
            return "revoked" if reply[1] == 2 else "unknown"
        record = Record.parse(reply[2])
        if record is None:  # pragma: no cover - the script answered 1: the record exists
            return "unknown"
        entry = Entry(record, int(reply[0]), born)
        self.cache.put(key_id, entry, epoch)
        return entry

    def _decide(self, key_id: str, record: Record, now: int) -> ResolvedKey | KeyFailure:
        if record.revoked_ms:
            return KeyFailure("revoked")
        expires = self._effective_expiry(record)
        if expires is not None and now >= expires:
            return KeyFailure("expired")
        warn_from = None
        warnings: list[KeyWarning] = []
        if expires is not None and self.policy.warn_days > 0:
            warn_from = expires - self.policy.warn_days * DAY_MS
            if now >= warn_from and not record.rotated_to:
                warnings.append(KeyWarning(
                    "key_expiring", f"this API key ({key_id}) expires at {_iso(expires)}; "
                    "rotate it before then"))
        if record.rotated_to and expires is not None:
            warnings.append(KeyWarning(
                "key_rotated", f"this API key ({key_id}) was replaced by {record.rotated_to} "
                f"and stops working at {_iso(expires)}; switch to the new key"))
        secret = (self._pepper.signing_secret(key_id, record.seed)
                  if record.require_signature and record.seed else None)
        return ResolvedKey(key_id, record.user, record.tier, record.org or None,
                           record.created_ms, expires, warn_from, record.require_signature,
                           record.rotated_to or None, tuple(warnings), secret)

    def _effective_expiry(self, record: Record) -> int | None:
        candidates = [record.expires_ms] if record.expires_ms else []
        if self.policy.max_age_days > 0:
            candidates.append(record.created_ms + self.policy.max_age_days * DAY_MS)
        return min(candidates) if candidates else None

    # --- admin ---

    async def create(self, user: str, tier: str, org: str | None = None,
                     expires_in_days: int | None = None,
                     require_signature: bool = False) -> CreatedKey:
        """A new key: the answer holds the key (and signing secret) for the only time."""
        days = self.check_create(user, tier, org, expires_in_days, require_signature)
        return await self._create(user, tier, org or "", days * DAY_MS, require_signature, "")

    def check_create(self, user: str, tier: str, org: str | None = None,
                     expires_in_days: int | None = None, require_signature: bool = False) -> int:
        """Checks `create`'s arguments without storing anything (KeyInputError names the
        field), so a caller can check before it spends anything; returns the key's lifetime in
        days (0: no expiry)."""
        _check_text("user", user)
        _check_text("tier", tier)
        if self._known_tiers is not None and tier not in self._known_tiers:
            raise KeyInputError("tier", f"unknown tier {tier!r} (known: "
                                        f"{', '.join(sorted(self._known_tiers))})")
        if org is not None:
            _check_text("org", org)
        if not isinstance(require_signature, bool):
            raise KeyInputError("require_signature", "must be true or false")
        max_age = self.policy.max_age_days
        if expires_in_days is not None:
            if (isinstance(expires_in_days, bool) or not isinstance(expires_in_days, int)
                    or not 1 <= expires_in_days <= MAX_EXPIRES_IN_DAYS):
                raise KeyInputError("expires_in_days",
                                    f"must be a whole number from 1 to {MAX_EXPIRES_IN_DAYS}")
            if max_age and expires_in_days > max_age:
                raise KeyInputError("expires_in_days",
                                    f"must be at most [keys] max_age_days = {max_age}")
        return expires_in_days if expires_in_days is not None else max_age

    async def _create(self, user: str, tier: str, org: str, lifetime_ms: int,
                      require_signature: bool, rotated_from: str) -> CreatedKey:
        for _ in range(3):  # a key id taken already: 2^-96 per try
            api_key = generate_api_key()
            key_id = self._pepper.key_id(api_key)
            seed = secrets.token_hex(32) if require_signature else ""
            fields = ["h", self._pepper.key_hash(api_key), "u", user, "o", org, "t", tier,
                      "rt", "", "rf", rotated_from, "sg", "1" if require_signature else "0",
                      "s", seed]
            status, _now, expires = await self._create_script(
                keys=[record_key(key_id)],
                args=[self._override(), lifetime_ms, RETENTION_MS, *fields])
            if status == 1:
                secret = self._pepper.signing_secret(key_id, seed) if seed else None
                return CreatedKey(key_id, api_key, int(expires) or None, secret)
        raise RuntimeError("three new API keys in a row had ids already taken")

    async def rotate(self, key_id: str, grace_s: int | None = None) -> RotatedKey:
        """A new key for the same user, org and tier; the old one keeps working `grace_s`
        (default rotation_grace_s) more, never past its own expiry."""
        grace = self.policy.rotation_grace_s if grace_s is None else grace_s
        if isinstance(grace, bool) or not isinstance(grace, int) or not 0 <= grace <= MAX_GRACE_S:
            raise KeyInputError("grace_s", f"must be a whole number from 0 to {MAX_GRACE_S}")
        old = await self._record(key_id)
        if old is None:
            raise KeyNotFoundError(key_id)
        now, record = old
        if record.revoked_ms:
            raise KeyStateError("key_revoked", f"{key_id} is revoked; create a new key")
        if record.rotated_to:
            raise KeyStateError("key_rotated", f"{key_id} was rotated already, to "
                                               f"{record.rotated_to}; rotate that one")
        expires = self._effective_expiry(record)
        if expires is not None and now >= expires:
            raise KeyStateError("key_expired", f"{key_id} has expired; create a new key")
        lifetime = (record.expires_ms - record.created_ms if record.expires_ms
                    else self.policy.max_age_days * DAY_MS)
        if self.policy.max_age_days:
            lifetime = min(lifetime, self.policy.max_age_days * DAY_MS)
        new = await self._create(record.user, record.tier, record.org, lifetime,
                                 record.require_signature, key_id)
        status, _now, *rest = await self._rotate_script(
            keys=[record_key(key_id)],
            args=[self._override(), new.key_id, grace * 1000,
                  self.policy.max_age_days * DAY_MS, RETENTION_MS])
        if status != 1:
            await self._redis.delete(record_key(new.key_id))
            raise {0: KeyNotFoundError(key_id),
                   -1: KeyStateError("key_revoked", f"{key_id} is revoked; create a new key"),
                   -2: KeyStateError("key_rotated", f"{key_id} was rotated already"),
                   -3: KeyStateError("key_expired", f"{key_id} has expired; create a new key"),
                   }[int(status)]
        await self._invalidations.publish(key_id)
        return RotatedKey(new.key_id, new.api_key, new.expires_at_ms, key_id, int(rest[0]),
                          new.signing_secret)

    async def revoke(self, key_id: str) -> bool:
        """Revokes the key: every daemon refuses it within 1 s. False when it was revoked
        already (still revoked: a repeat is harmless)."""
        if not _KEY_ID.fullmatch(key_id):
            raise KeyNotFoundError(key_id)
        status, _now, _at = await self._revoke_script(
            keys=[record_key(key_id)], args=[self._override(), RETENTION_MS])
        if status == 0:
            raise KeyNotFoundError(key_id)
        await self._invalidations.publish(key_id)
        return int(status) == 1

    async def show(self, key_id: str) -> KeyInfo:
        found = await self._record(key_id)
        if found is None:
            raise KeyNotFoundError(key_id)
        now, record = found
        expires = self._effective_expiry(record)
        state: KeyState
        if record.revoked_ms:
            state = "revoked"
        elif expires is not None and now >= expires:
            state = "expired"
        elif record.rotated_to:
            state = "rotated"
        else:
            state = "active"
        return KeyInfo(key_id, record.user, record.org or None, record.tier, state,
                       record.created_ms, expires, record.revoked_ms or None,
                       record.rotated_to or None, record.rotated_from or None,
                       record.require_signature)

    async def _record(self, key_id: str) -> tuple[int, Record] | None:
        if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
            return None
        now, values = await self._read(keys=[record_key(key_id)], args=[self._override()])
        record = Record.parse(values)
        return (self._clock() if self._clock else int(now), record) if record else None

    def _override(self) -> int:
        return self._clock() if self._clock else 0


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise KeyInputError(name, "must be a non-empty string")
    if len(value) > MAX_ID_CHARS:
        raise KeyInputError(name, f"must be at most {MAX_ID_CHARS} characters")
    if _CONTROL.search(value):
        raise KeyInputError(name, "must not contain control characters")


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
