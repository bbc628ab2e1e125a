"""The quota engine: turns a plan (subjects and their limits) into function calls.

Each subject is one Redis hash slot (`rl:{scope:id}`); a reserve visits the subjects in order
and, when a later one denies, releases what the earlier ones reserved, so a reserve is all or
nothing. The decision logic itself lives in lua/; this module only builds keys and arguments
(wire.py's formats), follows the subjects, and shapes the replies.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal
from zoneinfo import ZoneInfo

import orjson

from ratelimitd.policy import Limit, Prices, Subject
from ratelimitd.quota import wire
from ratelimitd.quota.calendar import Calendar
from ratelimitd.quota.runner import ScriptRunner
from ratelimitd.quota.wire import ReserveMode, ReserveStatus, SettleMode, SettleStatus
from ratelimitd.store.transport import Transport

RID_PREFIX: Final = "rsv_"
MAX_RID_CHARS: Final = 1024
_RID_RANDOM: Final = re.compile(r"[A-Za-z0-9_-]{16,64}")
# A reservation id's random part: 144 bits, drawn from the OS this many ids at a time (one
# getrandom call per reserve was a measurable share of a reserve's CPU)
_RANDOM_BYTES: Final = 18
_RANDOM_BATCH: Final = 455

SettleOutcome = Literal["applied", "duplicate", "not_found", "conflict"]
_OUTCOMES: Final[dict[SettleStatus, SettleOutcome]] = {
    SettleStatus.APPLIED: "applied", SettleStatus.DUPLICATE: "duplicate",
    SettleStatus.NOT_FOUND: "not_found", SettleStatus.CONFLICT: "conflict",
}


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
    status: SettleOutcome
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


def _keys(tag: str, rand: str) -> list[str | int]:
    """FCALL's numkeys and keys: the subject's limit state and its record of one
    reservation, in one hash slot."""
    base = f"rl:{{{tag}}}"
    return [2, base, f"{base}:r:{rand}"]


def reservation_id(primary: Subject, rand: str) -> str:
    tag = base64.urlsafe_b64encode(primary.tag.encode()).rstrip(b"=").decode()
    return f"{RID_PREFIX}{rand}.{tag}"


def parse_reservation_id(rid: str) -> tuple[str, str] | None:
    """rid -> (random part, primary subject tag), or None when it cannot be ours."""
    if not rid.startswith(RID_PREFIX) or len(rid) > MAX_RID_CHARS:
        return None
    rand, _, tag64 = rid[len(RID_PREFIX):].partition(".")
    if not _RID_RANDOM.fullmatch(rand) or not tag64:
        return None
    try:
        tag = base64.urlsafe_b64decode(tag64 + "=" * (-len(tag64) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    return rand, tag


class Engine:
    """Reserve, commit and release against Redis. Production always runs on Redis time."""

    def __init__(self, transport: Transport, settings: EngineSettings | None = None) -> None:
        self.settings = settings or EngineSettings()
        self.scripts = ScriptRunner(transport)
        self._random = b""
        self._calendar = Calendar(ZoneInfo(self.settings.timezone))
        self._clock: Callable[[], int] | None = None
        self._specs: dict[Limit, bytes] = {}
        # the records' TTL as text: a number passed on to a Redis command costs Lua a printf
        self._ttl_text = str(self.settings.reservation_ttl_ms)

    @classmethod
    def with_test_clock(
        cls, transport: Transport, clock: Callable[[], int],
        settings: EngineSettings | None = None
    ) -> Engine:
        """An engine whose scripts use `clock()` (ms) instead of Redis TIME. Tests only."""
        engine = cls(transport, settings)
        engine._clock = clock
        return engine

    def _random_id(self) -> str:
        """The random part of a reservation id."""
        if len(self._random) < _RANDOM_BYTES:
            self._random = os.urandom(_RANDOM_BYTES * _RANDOM_BATCH)
        chunk, self._random = self._random[:_RANDOM_BYTES], self._random[_RANDOM_BYTES:]
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
        head = (lim.lid.encode(), wire.ALGORITHM_CODES[lim.algorithm],
                wire.METRIC_CODES[lim.metric])
        if lim.algorithm == "calendar":
            return wire.SPEC_HEAD.pack(*head, lim.limit)   # + the period starts, per call
        if lim.algorithm == "token_bucket":
            a, b = lim.window_ms, lim.burst
        elif lim.metric == "concurrent":
            # in-flight calls are a sliding window as long as a reservation lives
            a, b = self.settings.reservation_ttl_ms, lim.buckets
        else:
            a, b = lim.window_ms, lim.buckets
        return wire.SPEC.pack(*head, lim.limit, a, b, 0, 0)

    # -- reserve ---------------------------------------------------------------------------

    async def reserve(self, req: ReserveRequest) -> ReserveResult:
        primary = req.plan[0][0]
        if req.idempotency_key is not None:
            digest = hashlib.sha256(f"{primary.tag}\0{req.idempotency_key}".encode()).digest()
            rand = base64.urlsafe_b64encode(digest[:_RANDOM_BYTES]).decode()
        else:
            rand = self._random_id()
        rid = reservation_id(primary, rand)
        mode = ReserveMode.DRY_RUN if req.dry_run else (
            ReserveMode.RETRY if req.idempotency_key is not None else ReserveMode.RESERVE)
        others = orjson.dumps([s.tag for s, _ in req.plan[1:]]).decode()
        grant = req.max_output_tokens
        holds: list[_SubjectHold] = []
        first: wire.ReserveReply | None = None
        for index, (subject, limits) in enumerate(req.plan):
            reply = wire.decode_reserve(await self.scripts.run(self.scripts.library.reserve, [
                *_keys(subject.tag, rand),
                wire.RESERVE_ARGS.pack(
                    self._clock_override(), mode, self.settings.reservation_ttl_ms,
                    req.input_tokens, grant, req.min_output_tokens, req.prices.input,
                    req.prices.cached_input, req.prices.output),
                others if index == 0 else "[]", self._specs_arg(limits), self._ttl_text]))
            hold = _SubjectHold(subject, limits, reply.granted_output,
                                _states(subject, limits, reply.limit_states))
            if reply.status == ReserveStatus.DENIED:
                await self._undo(holds, rand)
                states = [s for done in holds for s in done.states] + hold.states
                retry = reply.retry_after_ms
                return ReserveResult(
                    allowed=False, reservation_id="", expires_at_ms=0,
                    input_tokens=req.input_tokens, max_output_tokens=0, states=states,
                    denied_by=hold.states[reply.denied_limit - 1],
                    retry_after_ms=None if retry < 0 else retry)
            holds.append(hold)
            if first is None:
                first = reply
                # a retry answers with the reservation it repeats, whatever cap it asks for
                grant = (hold.granted if reply.status == ReserveStatus.REPEAT
                         else min(grant, hold.granted))
            else:
                grant = min(grant, hold.granted)
        assert first is not None  # the plan always has the caller's user
        cost = first.reserved_cost_nano
        if not req.dry_run and holds[0].granted > grant:
            cost = await self._shrink(holds, rand, grant)
        return ReserveResult(
            allowed=True, reservation_id="" if req.dry_run else rid,
            expires_at_ms=first.expires_at_ms, input_tokens=first.input_tokens,
            max_output_tokens=grant, states=[s for hold in holds for s in hold.states],
            reserved_cost_nano=cost, duplicate=first.status == ReserveStatus.REPEAT)

    async def _undo(self, holds: list[_SubjectHold], rand: str) -> None:
        """A later subject denied: give back what the earlier subjects reserved."""
        for hold in holds:
            await self._settle(hold.subject.tag, rand, SettleMode.RELEASE, 0, 0, 0)

    async def _shrink(self, holds: list[_SubjectHold], rand: str, grant: int) -> int:
        """A later subject granted less output: earlier subjects keep only the final grant,
        and report their limits as they are then. Returns the reservation's cost (nano-USD)."""
        cost = 0
        for hold in holds:
            if hold.granted > grant:
                reply = await self._settle(hold.subject.tag, rand, SettleMode.RESIZE, 0, 0, grant)
                cost = reply.reserved_cost_nano
                hold.states = _states(hold.subject, hold.limits, reply.limit_states)
        return cost

    # -- commit / release ------------------------------------------------------------------

    async def commit(
        self, rid: str, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0
    ) -> SettleResult:
        """Replaces the estimate by the actual usage, on every subject the reserve charged."""
        return await self._settle_all(rid, SettleMode.COMMIT, input_tokens, cached_input_tokens,
                                      output_tokens)

    async def release(self, rid: str) -> SettleResult:
        """Refunds a call that never happened and frees its concurrency slot."""
        return await self._settle_all(rid, SettleMode.RELEASE, 0, 0, 0)

    async def _settle_all(
        self, rid: str, mode: SettleMode, input_tokens: int, cached: int, output: int
    ) -> SettleResult:
        parsed = parse_reservation_id(rid)
        if parsed is None:
            return SettleResult("not_found")
        rand, primary = parsed
        reply = await self._settle(primary, rand, mode, input_tokens, cached, output)
        result = SettleResult(
            _OUTCOMES[reply.status], reply.input_tokens, reply.cached_input_tokens,
            reply.output_tokens, reply.cost_nano, reply.reserved_tokens, reply.reserved_cost_nano)
        if reply.status in (SettleStatus.APPLIED, SettleStatus.DUPLICATE):
            # Each subject settles exactly once on its own, so a repeat also finishes what a
            # crash may have left half done; the primary's record holds the usage to apply.
            for tag in orjson.loads(reply.others or b"[]"):
                await self._settle(tag, rand, mode, result.input_tokens,
                                   result.cached_input_tokens, result.output_tokens)
        return result

    async def _settle(
        self, tag: str, rand: str, mode: SettleMode, input_tokens: int, cached: int, output: int
    ) -> wire.SettleReply:
        return wire.decode_settle(await self.scripts.run(self.scripts.library.settle, [
            *_keys(tag, rand),
            wire.SETTLE_ARGS.pack(self._clock_override(), mode, input_tokens, cached, output),
            self._ttl_text]))


@dataclass(slots=True)
class _SubjectHold:
    """What one subject of a reserve holds: what it granted and what its limits say."""

    subject: Subject
    limits: Sequence[Limit]
    granted: int
    states: list[LimitState]


def _states(subject: Subject, limits: Sequence[Limit], pairs: Sequence[int]
            ) -> list[LimitState]:
    """Limit states from a reply's tail: remaining, reset ms per limit."""
    return [LimitState(lim, subject, pairs[2 * k], pairs[2 * k + 1])
            for k, lim in enumerate(limits)]
