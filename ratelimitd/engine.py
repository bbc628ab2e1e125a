"""The quota engine: turns a plan (subjects and their limits) into script calls.

Each subject is one Redis hash slot (`rl:{scope:id}`); a reserve visits them in order and, when
a later one denies, releases what the earlier ones reserved, so a reserve is all or nothing.
The decision logic itself lives in lua/; this module only builds keys and arguments, follows
the slots, and shapes the replies.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final, Literal
from zoneinfo import ZoneInfo

import orjson

from ratelimitd.policy import Limit, Subject
from ratelimitd.scripts import Pipe, RedisClient, ScriptRunner

# lua/common.lua's codes
_METRIC_CODES: Final = {
    "requests": 1, "tokens": 2, "input_tokens": 3, "output_tokens": 4, "cost_usd": 5,
    "concurrent": 6,
}
_ALGORITHM_CODES: Final = {"sliding": 1, "calendar": 2, "token_bucket": 3}
# lua/common.lua's SPEC: lid, algorithm, metric, limit, then four parameters (see there)
_SPEC: Final = struct.Struct("<8sBBddddd")
_SPEC_HEAD: Final = struct.Struct("<8sBBd")
_CALENDAR_STARTS: Final = struct.Struct("<dddd")
_COUNT: Final = struct.Struct("<q")
# lua/reserve.lua's and settle.lua's numeric arguments, packed (Lua parses strings slowly);
# the first two: a test clock's ms (0: Redis TIME) and the mode's code
_RESERVE_NUMBERS: Final = struct.Struct("<9d")
_SETTLE_NUMBERS: Final = struct.Struct("<5d")
_RESERVE, _DRY_RUN, _RETRY = 1, 2, 3
_SETTLE_MODES: Final = {"commit": 1, "release": 2, "resize": 3}
_RID_PREFIX: Final = "rsv_"
_RID_RANDOM: Final = re.compile(r"[A-Za-z0-9_-]{16,64}")

SettleStatus = Literal["applied", "duplicate", "not_found", "conflict"]
_SETTLE_STATUS: Final[dict[int, SettleStatus]] = {
    0: "not_found", 1: "applied", 2: "duplicate", 3: "conflict",
}


@dataclass(frozen=True, slots=True)
class Prices:
    """Micro-USD per 1M tokens: tokens x price / 1000 is nano-USD."""

    input: int
    output: int
    cached_input: int


# Per-request values are plain (not frozen) dataclasses: a frozen one costs five times as much
# to build, and a reserve builds several.
@dataclass(slots=True)
class ReserveRequest:
    plan: Sequence[tuple[Subject, Sequence[Limit]]]
    input_tokens: int
    max_output_tokens: int
    prices: Prices
    min_output_tokens: int = 16
    idempotency_key: str | None = None
    dry_run: bool = False


@dataclass(slots=True)
class LimitState:
    limit: Limit
    subject: Subject
    remaining: int
    reset_ms: int


@dataclass(slots=True)
class ReserveResult:
    allowed: bool
    reservation_id: str
    expires_at_ms: int
    input_tokens: int
    max_output_tokens: int
    states: list[LimitState]
    reserved_cost_nano: int = 0
    denied_by: LimitState | None = None
    retry_after_ms: int | None = None      # None: the call can never fit this limit
    duplicate: bool = False


@dataclass(slots=True)
class SettleResult:
    status: SettleStatus
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    cost_nano: int = 0
    reserved_tokens: int = 0
    reserved_cost_nano: int = 0


@dataclass(frozen=True, slots=True)
class EngineSettings:
    reservation_ttl_ms: int = 300_000
    timezone: str = "UTC"
    redis_timeout_ms: int | None = None     # per batch of script calls; None: no bound


@dataclass(slots=True)
class _Calendar:
    """Period boundaries of the configured timezone, cached while the period lasts.

    Lua has no timezone database, so the script gets the starts of the previous, current and
    next two periods (by the daemon's clock) and picks the one Redis time falls in: daylight
    saving is right, and a daemon clock off by up to a period still yields Redis-time answers.
    """

    zone: ZoneInfo
    cache: dict[str, tuple[int, int, bytes]] = field(default_factory=dict)

    def boundaries(self, period: str, now_ms: int) -> bytes:
        hit = self.cache.get(period)
        if hit and hit[0] <= now_ms < hit[1]:
            return hit[2]
        local = datetime.fromtimestamp(now_ms / 1000, self.zone)
        start = _period_start(local, period)
        starts = [_shift(start, period, k) for k in (-1, 0, 1, 2)]
        ms = [int(s.timestamp() * 1000) for s in starts]
        packed = _CALENDAR_STARTS.pack(*ms)
        self.cache[period] = (ms[1], ms[2], packed)
        return packed


def _period_start(local: datetime, period: str) -> datetime:
    day = local.replace(hour=0, minute=0, second=0, microsecond=0)
    return day.replace(day=1) if period == "month" else day


def _shift(start: datetime, period: str, k: int) -> datetime:
    """Start of the k-th period after `start`, at local midnight (DST-aware)."""
    if period == "month":
        months = start.month - 1 + k
        naive = start.replace(tzinfo=None, year=start.year + months // 12, month=months % 12 + 1)
    else:
        naive = start.replace(tzinfo=None) + timedelta(days=k)
    return naive.replace(tzinfo=start.tzinfo)


def _keys(tag: str, rand: str) -> list[str | int]:
    """FCALL's numkeys and keys: the subject's limit state and its record of one
    reservation, in one hash slot."""
    base = f"rl:{{{tag}}}"
    return [2, base, f"{base}:r:{rand}"]


def reservation_id(primary: Subject, rand: str) -> str:
    tag = base64.urlsafe_b64encode(primary.tag.encode()).rstrip(b"=").decode()
    return f"{_RID_PREFIX}{rand}.{tag}"


def parse_reservation_id(rid: str) -> tuple[str, str] | None:
    """rid -> (random part, primary subject tag), or None when it cannot be ours."""
    if not rid.startswith(_RID_PREFIX) or len(rid) > 1024:
        return None
    rand, _, tag64 = rid[len(_RID_PREFIX):].partition(".")
    if not _RID_RANDOM.fullmatch(rand) or not tag64:
        return None
    try:
        tag = base64.urlsafe_b64decode(tag64 + "=" * (-len(tag64) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    return rand, tag


class Engine:
    """Reserve, commit and release against Redis. Production always runs on Redis time."""

    def __init__(self, client: RedisClient, settings: EngineSettings | None = None,
                 pipe: Pipe | None = None) -> None:
        """client: redis-py's; pipe: the hot path's connection, where there is one."""
        self.settings = settings or EngineSettings()
        timeout = self.settings.redis_timeout_ms
        self.scripts = ScriptRunner(client, None if timeout is None else timeout / 1000, pipe)
        self._random = b""
        self._calendar = _Calendar(ZoneInfo(self.settings.timezone))
        self._clock: Callable[[], int] | None = None
        self._specs: dict[Limit, bytes] = {}
        # the records' TTL as text: a number passed on to a Redis command costs Lua a printf
        self._ttl_text = str(self.settings.reservation_ttl_ms)

    @classmethod
    def with_test_clock(
        cls, client: RedisClient, clock: Callable[[], int], settings: EngineSettings | None = None
    ) -> Engine:
        """An engine whose scripts use `clock()` (ms) instead of Redis TIME. Tests only."""
        engine = cls(client, settings)
        engine._clock = clock
        return engine

    def _random_id(self) -> str:
        """144 random bits for a reservation id, from OS randomness drawn 8 KiB at a time
        (one getrandom call per reserve was a measurable share of a reserve's CPU)."""
        if len(self._random) < 18:
            self._random = os.urandom(18 * 455)
        chunk, self._random = self._random[:18], self._random[18:]
        return base64.urlsafe_b64encode(chunk).decode()

    def _clock_override(self) -> int:
        """The scripts' clock argument: the test clock's ms, or 0 for Redis TIME."""
        return 0 if self._clock is None else self._clock()

    def _now_ms(self) -> int:
        return time.time_ns() // 1_000_000 if self._clock is None else self._clock()

    def _specs_arg(self, limits: Sequence[Limit]) -> bytes:
        """The scripts' limit specs; all but calendar boundaries are encoded once per limit."""
        parts: list[bytes] = []
        now: int | None = None
        for lim in limits:
            spec = self._specs.get(lim)
            if spec is None:
                spec = self._specs[lim] = self._encode_spec(lim)
            if lim.algorithm == "calendar":
                now = self._now_ms() if now is None else now
                parts += (spec, self._calendar.boundaries(lim.period, now))
            else:
                parts.append(spec)
        return b"".join(parts)

    def _encode_spec(self, lim: Limit) -> bytes:
        head = (lim.lid.encode(), _ALGORITHM_CODES[lim.algorithm], _METRIC_CODES[lim.metric])
        if lim.algorithm == "calendar":
            return _SPEC_HEAD.pack(*head, lim.limit)   # + the period starts, per call
        if lim.algorithm == "token_bucket":
            a, b = lim.window_ms, lim.burst
        elif lim.metric == "concurrent":
            # in-flight calls are a sliding window as long as a reservation lives
            a, b = self.settings.reservation_ttl_ms, lim.buckets
        else:
            a, b = lim.window_ms, lim.buckets
        return _SPEC.pack(*head, lim.limit, a, b, 0, 0)

    # -- reserve ---------------------------------------------------------------------------

    async def reserve(self, req: ReserveRequest) -> ReserveResult:
        primary = req.plan[0][0]
        if req.idempotency_key is not None:
            digest = hashlib.sha256(f"{primary.tag}\0{req.idempotency_key}".encode()).digest()
            rand = base64.urlsafe_b64encode(digest[:18]).decode()
        else:
            rand = self._random_id()
        rid = reservation_id(primary, rand)
        mode = _DRY_RUN if req.dry_run else (_RETRY if req.idempotency_key is not None
                                               else _RESERVE)
        others = orjson.dumps([s.tag for s, _ in req.plan[1:]]).decode()
        grant = req.max_output_tokens
        slots: list[_Slot] = []
        for index, (subject, limits) in enumerate(req.plan):
            reply, _ = _unpack(await self.scripts.run(self.scripts.reserve, [
                *_keys(subject.tag, rand),
                _RESERVE_NUMBERS.pack(self._clock_override(), mode,
                                      self.settings.reservation_ttl_ms, req.input_tokens, grant,
                                      req.min_output_tokens, req.prices.input,
                                      req.prices.cached_input, req.prices.output),
                others if index == 0 else "[]", self._specs_arg(limits), self._ttl_text]))
            slot = _Slot(subject, limits, reply[1], _states(subject, limits, reply[7:]))
            if reply[0] == 0:
                await self._undo(slots, rand)
                states = [s for done in slots for s in done.states] + slot.states
                retry = reply[4]
                return ReserveResult(False, "", 0, req.input_tokens, 0, states, 0,
                                     slot.states[reply[3] - 1], None if retry < 0 else retry)
            slots.append(slot)
            if index == 0:
                first = reply
                # a retry answers with the reservation it repeats, whatever cap it asks for
                grant = slot.granted if reply[0] == 2 else min(grant, slot.granted)
            else:
                grant = min(grant, slot.granted)
        cost = first[6]
        if not req.dry_run and slots[0].granted > grant:
            cost = await self._shrink(slots, rand, grant)
        return ReserveResult(True, "" if req.dry_run else rid, first[2], first[5], grant,
                             [s for slot in slots for s in slot.states], cost,
                             duplicate=first[0] == 2)

    async def _undo(self, slots: list[_Slot], rand: str) -> None:
        """A later slot denied: give back what the earlier slots reserved."""
        for slot in slots:
            await self._settle(slot.subject.tag, rand, "release", 0, 0, 0)

    async def _shrink(self, slots: list[_Slot], rand: str, grant: int) -> int:
        """A later slot granted less output: earlier slots keep only the final grant, and
        report their limits as they are then. Returns the reservation's cost (nano-USD)."""
        cost = 0
        for slot in slots:
            if slot.granted > grant:
                reply, _ = await self._settle(slot.subject.tag, rand, "resize", 0, 0, grant)
                cost = _settle_result(reply).reserved_cost_nano
                slot.states = _states(slot.subject, slot.limits, reply[7:])
        return cost

    # -- commit / release ------------------------------------------------------------------

    async def commit(
        self, rid: str, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0
    ) -> SettleResult:
        """Replaces the estimate by the actual usage, on every subject the reserve charged."""
        return await self._settle_all(rid, "commit", input_tokens, cached_input_tokens,
                                      output_tokens)

    async def release(self, rid: str) -> SettleResult:
        """Refunds a call that never happened and frees its concurrency slot."""
        return await self._settle_all(rid, "release", 0, 0, 0)

    async def _settle_all(
        self, rid: str, mode: str, input_tokens: int, cached: int, output: int
    ) -> SettleResult:
        parsed = parse_reservation_id(rid)
        if parsed is None:
            return SettleResult("not_found")
        rand, primary = parsed
        reply, others = await self._settle(primary, rand, mode, input_tokens, cached, output)
        result = _settle_result(reply)
        if result.status in ("applied", "duplicate"):
            # Each slot settles exactly once on its own, so a repeat also finishes what a
            # crash may have left half done; the primary's record holds the usage to apply.
            for tag in orjson.loads(others or b"[]"):
                await self._settle(tag, rand, mode, result.input_tokens,
                                   result.cached_input_tokens, result.output_tokens)
        return result

    async def _settle(
        self, tag: str, rand: str, mode: str, input_tokens: int, cached: int, output: int
    ) -> tuple[tuple[int, ...], bytes]:
        return _unpack(await self.scripts.run(self.scripts.settle, [
            *_keys(tag, rand),
            _SETTLE_NUMBERS.pack(self._clock_override(), _SETTLE_MODES[mode], input_tokens, cached,
                                 output),
            self._ttl_text]))


@dataclass(slots=True)
class _Slot:
    """One subject of a reserve: what it granted and what its limits say."""

    subject: Subject
    limits: Sequence[Limit]
    granted: int
    states: list[LimitState]


def _unpack(reply: bytes) -> tuple[tuple[int, ...], bytes]:
    """A script's packed reply (common.lua's packed_reply): its numbers, and the tail."""
    (count,) = _COUNT.unpack_from(reply)
    end = 8 + 8 * count
    return struct.unpack_from(f"<{count}q", reply, 8), reply[end:]


def _states(subject: Subject, limits: Sequence[Limit], pairs: Sequence[int]
            ) -> list[LimitState]:
    """Limit states from a script's reply tail: remaining, reset ms per limit."""
    return [LimitState(lim, subject, pairs[2 * k], pairs[2 * k + 1])
            for k, lim in enumerate(limits)]


def _settle_result(reply: Sequence[int]) -> SettleResult:
    """settle.lua's reply: status, then the numbers."""
    return SettleResult(_SETTLE_STATUS[reply[0]], *reply[1:7])
