"""The quota engine: turns a plan (subjects and their limits) into function calls.

Each subject is one Redis hash slot (`rl:{scope:id}`); a reserve visits the subjects in order
and, when a later one denies or a call fails, cancels that attempt on the subjects it reached
(compensation.py), so a reserve is all or nothing. A subject that denied lately is asked first,
read-only, so that a reserve it will deny holds nobody else's quota meanwhile. The decision
logic itself lives in lua/; this module only builds keys and arguments (wire.py's formats),
follows the subjects, and shapes the replies.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from os import urandom as os_random
from typing import Any, Final
from zoneinfo import ZoneInfo

import orjson

from ratelimitd.errors import (
    IdempotencyKeyReused,
    ReserveInProgress,
    StoreReplyError,
    StoreUnavailable,
)
from ratelimitd.policy import Limit, Prices, Subject
from ratelimitd.quota import ids, wire
from ratelimitd.quota.alert_record import Alert
from ratelimitd.quota.calendar import Calendar
from ratelimitd.quota.calls import anomaly_args, call_keys, decode_alerts, encode_spec
from ratelimitd.quota.compensation import Compensator
from ratelimitd.quota.ids import ReservationIds
from ratelimitd.quota.model import (
    Blocked,
    EngineSettings,
    LimitState,
    PeekResult,
    ReserveRequest,
    ReserveResult,
    SettleOutcome,
    SettleResult,
)
from ratelimitd.quota.runner import ScriptRunner
from ratelimitd.quota.wire import ReserveMode, ReserveStatus, SettleMode, SettleStatus
from ratelimitd.store.transport import Transport

# How long a daemon keeps using the id secret before reading it from Redis again (a Redis that
# lost its data gets a new one, and every daemon must follow)
SECRET_REFRESH_S: Final = 60.0
# A subject that denied is asked first, read-only, for this long (at most; its retry-after
# when shorter, but at least the minimum); the daemon remembers this many such subjects
DENYING_MIN_MS, DENYING_MAX_MS, DENYING_MAX_SUBJECTS = 1_000, 10_000, 10_000

# Limits one PEEK call reads (a reserve carries at most lua/core.lua's MAX_LIMITS)
MAX_PEEK_LIMITS: Final = 8
_NO_PRICES: Final = Prices(input=0, output=0, cached_input=0)

_OUTCOMES: Final[dict[SettleStatus, SettleOutcome]] = {
    SettleStatus.APPLIED: "applied", SettleStatus.DUPLICATE: "duplicate",
    SettleStatus.NOT_FOUND: "not_found", SettleStatus.CONFLICT: "conflict",
}


class Engine:
    """Reserve, commit and release against Redis. Production always runs on Redis time."""

    def __init__(self, transport: Transport, settings: EngineSettings | None = None) -> None:
        self.settings = settings or EngineSettings()
        self.transport = transport
        self.scripts = ScriptRunner(transport)
        self._ids: ReservationIds | None = None
        self._ids_read_at = 0.0
        self._calendar = Calendar(ZoneInfo(self.settings.timezone))
        self._clock: Callable[[], int] | None = None
        self._specs: dict[Limit, bytes] = {}
        self._denying: dict[str, float] = {}       # subject tag -> until (monotonic s)
        ttl = self.settings.reservation_ttl_ms
        self._record_ttl_ms = ttl + self.settings.commit_grace_ms
        self.compensator = Compensator(self._cancel, self._record_ttl_ms / 1000)
        ppm = sorted({round(t * wire.PPM) for t in self.settings.alert_thresholds})
        # a settle's lowest threshold, then all of them (after its SETTLE_ARGS)
        self._lowest_threshold = ppm[0] if ppm else 0
        self._thresholds = struct.pack(f"<{len(ppm)}d", *ppm)
        # ANOMALY_ARGS by ReserveRequest.anomaly (False sends none)
        self._anomaly_args = anomaly_args(self.settings.anomaly)

    @classmethod
    def with_test_clock(
        cls, transport: Transport, clock: Callable[[], int],
        settings: EngineSettings | None = None
    ) -> Engine:
        """An engine whose scripts use `clock()` (ms) instead of Redis TIME. Tests only."""
        engine = cls(transport, settings)
        engine._clock = clock
        return engine

    async def aclose(self) -> None:
        await self.compensator.aclose()

    async def load_library(self) -> None:
        """Loads the function library now, so the first decisions do not pay for it."""
        await self.scripts.load()

    async def ready(self) -> None:
        """Raises StoreUnavailable unless Redis answers and holds the library (loading it)."""
        await self.scripts.ready()

    def _fresh_ids(self) -> ReservationIds | None:
        """The ids, when read lately (no coroutine: this is every decision's case)."""
        if self._ids is not None and time.monotonic() - self._ids_read_at < SECRET_REFRESH_S:
            return self._ids
        return None

    async def ids(self) -> ReservationIds:
        """Reservation ids under the secret all daemons share (made once, kept in Redis)."""
        fresh = self._fresh_ids()
        if fresh is not None:
            return fresh
        await self.transport.execute("SET", ids.SEAL_REDIS_KEY, os_random(ids.SECRET_BYTES), "NX")
        secret = await self.transport.execute("GET", ids.SEAL_REDIS_KEY)
        if not secret:
            raise StoreUnavailable("Redis lost the reservation id secret as it was read")
        self._ids, self._ids_read_at = ReservationIds(bytes(secret)), time.monotonic()
        return self._ids

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
                spec = self._specs[lim] = encode_spec(lim, self.settings.reservation_ttl_ms)
            if lim.algorithm == "calendar":
                now = self._now_ms() if now is None else now
                parts += (spec, self._calendar.boundaries(lim.period, now))
            else:
                parts.append(spec)
        return b"".join(parts)

    # -- reserve ---------------------------------------------------------------------------

    async def reserve(self, req: ReserveRequest) -> ReserveResult:
        ids_ = self._fresh_ids() or await self.ids()
        primary = req.plan[0][0]
        rand = (ids_.random() if req.idempotency_key is None
                else ids_.for_key(primary.tag, req.idempotency_key))
        call = _Attempt(req, rand, ids_.attempt(), ReserveMode.DRY_RUN if req.dry_run else (
            ReserveMode.RETRY if req.idempotency_key is not None else ReserveMode.RESERVE))
        denial = await self._precheck(call) if self._denying and not req.dry_run else None
        if denial is not None:
            return denial
        try:
            if req.guards:
                # the guards' checks leave with the first subject's call, in the same write
                checks = [self._send_check(call, subject) for subject in req.guards]
                try:
                    result = await self._reserve_all(call)
                except BaseException:
                    await asyncio.gather(*checks, return_exceptions=True)
                    raise
                blocked = await self._blocked(call, req.guards, checks)
                if blocked is not None and result.allowed:
                    await self._cancel_reached(call)
                    result = _blocked_result(req, blocked)
            else:
                result = await self._reserve_all(call)
        except (StoreUnavailable, ReserveInProgress):
            await self._cancel_reached(call)
            raise
        if result.allowed:
            result.reservation_id = "" if req.dry_run else ids_.make(primary.tag, rand)
        return result

    async def _cancel_reached(self, call: _Attempt) -> None:
        if not call.req.dry_run:
            await self.compensator.cancel_now(
                [(s.tag, call.rand, call.attempt) for s in call.reached])

    def _send_check(self, call: _Attempt, subject: Subject) -> Awaitable[Any]:
        """A guard's block check, sent now (on a pipelined connection, in the write of this
        event-loop tick); no task, no coroutine of its own: its reply is awaited later."""
        return self.scripts.send_reserve(self._reserve_args(call, subject, (), 0, "[]",
                                                            ReserveMode.CHECK, False))

    async def _blocked(self, call: _Attempt, guards: Sequence[Subject],
                       checks: Sequence[Awaitable[Any]]) -> Blocked | None:
        """The first of `guards` that is blocked, from the replies of their checks."""
        found: Blocked | None = None
        for subject, check in zip(guards, checks, strict=True):
            try:
                raw = await check
            except StoreReplyError as exc:
                if not exc.missing_function:
                    raise
                # Redis lost the library: the runner loads it and asks again
                raw = await self.scripts.reserve(self._reserve_args(
                    call, subject, (), 0, "[]", ReserveMode.CHECK, False))
            reply = wire.decode_reserve(raw)
            if found is None and reply.status == ReserveStatus.BLOCKED:
                found = Blocked(subject, reply.retry_after_ms, reply.tail.decode(errors="replace"))
        return found

    async def _reserve_all(self, call: _Attempt) -> ReserveResult:
        req = call.req
        others = orjson.dumps([s.tag for s, _ in req.plan[1:]]).decode()
        grant = req.max_output_tokens
        holds: list[_SubjectHold] = []
        first: wire.ReserveReply | None = None
        alerts: list[Alert] = []
        for index, (subject, limits) in enumerate(req.plan):
            reply = await self._reserve_on(call, subject, limits, grant,
                                           others if index == 0 else "[]", index=index)
            if reply.alerts:
                alerts = decode_alerts(reply.alerts)
            hold = _SubjectHold(subject, limits, reply.granted_output,
                                _states(subject, limits, reply.limit_states))
            if reply.status == ReserveStatus.BLOCKED:
                await self._undo(call, holds)
                blocked = _blocked_result(req, Blocked(subject, reply.retry_after_ms,
                                                       reply.tail.decode(errors="replace")))
                blocked.alerts = alerts
                return blocked
            if reply.status == ReserveStatus.DENIED:
                await self._undo(call, holds)
                if index > 0:
                    self._remember_denial(subject, reply.retry_after_ms)
                denied = _denied(req, [s for done in holds for s in done.states], hold, reply)
                denied.alerts = alerts
                return denied
            if reply.status == ReserveStatus.REPEAT:
                if index == 0:
                    return await self._repeat(call, reply, hold)
                # the first reserve with this key left its record here but not on the
                # primary: it is under way, or cut short and being cancelled
                raise ReserveInProgress("the first reserve with this idempotency_key has not "
                                        "finished; retry shortly")
            if reply.status == ReserveStatus.CANCELLED:
                raise StoreUnavailable("this reserve attempt was cancelled before it ran")
            if reply.status == ReserveStatus.REUSED:
                await self._undo(call, holds)
                raise IdempotencyKeyReused(
                    "this idempotency_key was used for another request (other subjects or "
                    "input tokens); use a new key for a new request")
            holds.append(hold)
            if first is None:
                first = reply
            if hold.granted < grant:
                grant = hold.granted
        assert first is not None  # the plan always has the caller's user
        cost = first.reserved_cost_nano
        if not req.dry_run and holds[0].granted > grant:
            cost = await self._shrink(call, holds, grant)
        return ReserveResult(
            allowed=True, reservation_id="", expires_at_ms=first.expires_at_ms,
            input_tokens=first.input_tokens, max_output_tokens=grant,
            states=[s for hold in holds for s in hold.states], reserved_cost_nano=cost,
            alerts=alerts)

    async def _reserve_on(self, call: _Attempt, subject: Subject, limits: Sequence[Limit],
                          grant: int, others: str, mode: ReserveMode | None = None,
                          index: int = -1) -> wire.ReserveReply:
        """One subject's call; `index`: its place in the plan (0: the primary), or -1."""
        mode = call.mode if mode is None else mode
        if mode in (ReserveMode.RESERVE, ReserveMode.RETRY):
            call.reached.append(subject)
        return wire.decode_reserve(await self.scripts.reserve(
            self._reserve_args(call, subject, limits, grant, others, mode, index == 0, index)))

    def _reserve_args(self, call: _Attempt, subject: Subject, limits: Sequence[Limit],
                      grant: int, others: str, mode: ReserveMode, primary: bool,
                      index: int = -1) -> list[Any]:
        req = call.req
        inputs = req.subject_inputs
        anomaly = self._anomaly_args[req.anomaly] if primary and req.anomaly else b""
        if req.record_ttl_ms is None:
            ttl, record_ttl = self.settings.reservation_ttl_ms, self._record_ttl_ms
        else:
            ttl = record_ttl = req.record_ttl_ms
        return [
            *call_keys(subject.tag, call.rand),
            wire.RESERVE_ARGS.pack(
                self._clock_override(), mode, ttl,
                req.input_tokens if inputs is None or index < 0 else inputs[index], grant,
                req.min_output_tokens, req.prices.input,
                req.prices.cached_input, req.prices.output, call.attempt, record_ttl,
                wire.RESERVE_ARGS.size + len(anomaly) + 1) + anomaly + others.encode(),
            self._specs_arg(limits)]

    async def _precheck(self, call: _Attempt) -> ReserveResult | None:
        """Asks each subject that denied lately (after the first), read-only: a reserve it
        denies now is answered without holding the other subjects' quota meanwhile."""
        now = time.monotonic()
        for index, (subject, limits) in enumerate(call.req.plan[1:], 1):
            until = self._denying.get(subject.tag)
            if until is None or until < now:
                continue
            reply = await self._reserve_on(call, subject, limits, call.req.max_output_tokens,
                                           "[]", ReserveMode.DRY_RUN, index)
            if reply.status == ReserveStatus.BLOCKED:
                return _blocked_result(call.req, Blocked(subject, reply.retry_after_ms,
                                                         reply.tail.decode(errors="replace")))
            if reply.status == ReserveStatus.DENIED:
                self._remember_denial(subject, reply.retry_after_ms)
                hold = _SubjectHold(subject, limits, 0,
                                    _states(subject, limits, reply.limit_states))
                return _denied(call.req, [], hold, reply)
            # another reserve's pre-check may have forgotten it meanwhile
            self._denying.pop(subject.tag, None)
        return None

    def _remember_denial(self, subject: Subject, retry_after_ms: int) -> None:
        if len(self._denying) >= DENYING_MAX_SUBJECTS:
            self._denying.clear()
        hold_ms = DENYING_MAX_MS if retry_after_ms < 0 else min(
            max(retry_after_ms, DENYING_MIN_MS), DENYING_MAX_MS)
        self._denying[subject.tag] = time.monotonic() + hold_ms / 1000

    async def _repeat(self, call: _Attempt, first: wire.ReserveReply, hold: _SubjectHold
                      ) -> ReserveResult:
        """An idempotent retry found the first reserve's record on the primary subject: it
        answers with that reservation once every other subject holds it too; until then the
        first reserve is still under way (or was cut short and is being cancelled)."""
        states = list(hold.states)
        for subject, limits in call.req.plan[1:]:
            reply = await self._reserve_on(call, subject, limits, 0, "[]", ReserveMode.CONFIRM)
            if reply.status != ReserveStatus.REPEAT:
                raise ReserveInProgress("the first reserve with this idempotency_key has not "
                                        "finished; retry shortly")
            states += _states(subject, limits, reply.limit_states)
        await self._adopt(call)
        return ReserveResult(
            allowed=True, reservation_id="", expires_at_ms=first.expires_at_ms,
            input_tokens=first.input_tokens, max_output_tokens=first.granted_output,
            states=states, reserved_cost_nano=first.reserved_cost_nano, duplicate=True)

    async def _adopt(self, call: _Attempt) -> None:
        """Every subject holds the first reserve: this retry takes its records over before it
        answers with them, so that cancels of the first attempt (which may have failed after
        its last call ran) leave them alone. A record gone meanwhile was cancelled: the first
        attempt failed, and what this retry took over is cancelled too. (A retry whose
        take-over times out leaves what it took over charged: the next retry answers with it,
        or it expires.)"""
        adopted: list[Subject] = []
        for subject, limits in call.req.plan:
            reply = await self._reserve_on(call, subject, limits, 0, "[]", ReserveMode.ADOPT)
            if reply.status != ReserveStatus.REPEAT:
                await self.compensator.cancel_now(
                    [(s.tag, call.rand, call.attempt) for s in adopted])
                raise ReserveInProgress("the first reserve with this idempotency_key failed "
                                        "as it finished; retry shortly")
            adopted.append(subject)

    async def _undo(self, call: _Attempt, holds: list[_SubjectHold]) -> None:
        """A later subject denied: give back what the earlier subjects reserved."""
        await self.compensator.cancel_now(
            [(hold.subject.tag, call.rand, call.attempt) for hold in holds])

    async def _cancel(self, tag: str, rand: str, attempt: int) -> None:
        await self._settle(tag, rand, SettleMode.CANCEL, 0, 0, 0, attempt)

    async def _shrink(self, call: _Attempt, holds: list[_SubjectHold], grant: int) -> int:
        """A later subject granted less output: earlier subjects keep only the final grant,
        and report their limits as they are then. Returns the reservation's cost (nano-USD)."""
        cost = 0
        for hold in holds:
            if hold.granted > grant:
                reply = await self._settle(hold.subject.tag, call.rand, SettleMode.RESIZE, 0, 0,
                                           grant)
                cost = reply.reserved_cost_nano
                hold.states = _states(hold.subject, hold.limits, reply.limit_states)
        return cost

    # -- commit / release ------------------------------------------------------------------

    def commit(
        self, rid: str, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0
    ) -> Awaitable[SettleResult]:
        """Replaces the estimate by the actual usage, on every subject the reserve charged."""
        return self._settle_all(rid, SettleMode.COMMIT, input_tokens, cached_input_tokens,
                                output_tokens)

    def release(self, rid: str) -> Awaitable[SettleResult]:
        """Refunds a call that never happened and frees its concurrency slot."""
        return self._settle_all(rid, SettleMode.RELEASE, 0, 0, 0)

    async def _settle_all(
        self, rid: str, mode: SettleMode, input_tokens: int, cached: int, output: int
    ) -> SettleResult:
        parsed = (self._fresh_ids() or await self.ids()).parse(rid)
        if parsed is None:
            return SettleResult("not_found")
        rand, primary = parsed
        reply, replicated = await self._settle_acked(primary, rand, mode, input_tokens, cached,
                                                     output)
        result = SettleResult(
            _OUTCOMES[reply.status], reply.input_tokens, reply.cached_input_tokens,
            reply.output_tokens, reply.cost_nano, reply.reserved_tokens, reply.reserved_cost_nano,
            decode_alerts(reply.alerts), replicated)
        if reply.status in (SettleStatus.APPLIED, SettleStatus.DUPLICATE):
            # Each subject settles exactly once on its own, so a repeat also finishes what a
            # crash may have left half done; the primary's record holds the usage to apply.
            for tag in orjson.loads(reply.others or b"[]"):
                other, replicated = await self._settle_acked(
                    tag, rand, mode, result.input_tokens, result.cached_input_tokens,
                    result.output_tokens)
                result.alerts += decode_alerts(other.alerts)
                if replicated is False:
                    result.replicated = False
        return result

    async def _settle_acked(
        self, tag: str, rand: str, mode: SettleMode, input_tokens: int, cached: int, output: int
    ) -> tuple[wire.SettleReply, bool | None]:
        """A commit's or release's settle of one subject: what `[redis] replicas_ack` waits
        for (store/replication.py); the reply, and whether the replicas acknowledged it."""
        raw, replicated = await self.scripts.settle_acked(
            self._settle_args(tag, rand, mode, input_tokens, cached, output, 0))
        return wire.decode_settle(raw), replicated

    async def _settle(
        self, tag: str, rand: str, mode: SettleMode, input_tokens: int, cached: int,
        output: int, attempt: int = 0
    ) -> wire.SettleReply:
        """A settle no replica acknowledgement is waited for: a cancel or a resize."""
        return wire.decode_settle(await self.scripts.settle(
            self._settle_args(tag, rand, mode, input_tokens, cached, output, attempt)))

    def _settle_args(self, tag: str, rand: str, mode: SettleMode, input_tokens: int,
                     cached: int, output: int, attempt: int) -> list[Any]:
        return [*call_keys(tag, rand),
                wire.SETTLE_ARGS.pack(self._clock_override(), mode, input_tokens, cached, output,
                                      attempt, self.settings.reservation_ttl_ms,
                                      self._lowest_threshold) + self._thresholds]

    # -- usage -------------------------------------------------------------------------------

    async def peek(self, subject: Subject, limits: Sequence[Limit]) -> PeekResult:
        """`subject`'s limits as they stand, read-only (at most MAX_PEEK_LIMITS per call; more
        are asked in several calls), and its block. Each limit's `used` may exceed it after
        an overrun."""
        used: list[int] = []
        resets: list[int] = []
        reason: str | None = None
        block_ms = 0
        chunks = [limits[i:i + MAX_PEEK_LIMITS] for i in range(0, len(limits), MAX_PEEK_LIMITS)]
        request = ReserveRequest([(subject, ())], 0, 0, _NO_PRICES)
        call = _Attempt(request, "peek", 0, ReserveMode.PEEK)
        for chunk in chunks or [()]:
            reply = await self._reserve_on(call, subject, chunk, 0, "[]")
            for k, lim in enumerate(chunk):
                remaining = reply.limit_states[2 * k]
                used.append(lim.capacity - remaining)
                resets.append(reply.limit_states[2 * k + 1])
            if reply.retry_after_ms > 0:
                reason, block_ms = reply.tail.decode(errors="replace"), reply.retry_after_ms
        return PeekResult(used, resets, reason, block_ms)


@dataclass(slots=True)
class _Attempt:
    """One reserve attempt: its request, reservation and attempt ids, mode, and the subjects
    it sent a charging call to (what a failure must cancel)."""

    req: ReserveRequest
    rand: str
    attempt: int
    mode: ReserveMode
    reached: list[Subject] = field(default_factory=list)


@dataclass(slots=True)
class _SubjectHold:
    """What one subject of a reserve holds: what it granted and what its limits say."""

    subject: Subject
    limits: Sequence[Limit]
    granted: int
    states: list[LimitState]


def _denied(req: ReserveRequest, states: list[LimitState], hold: _SubjectHold,
            reply: wire.ReserveReply) -> ReserveResult:
    retry = reply.retry_after_ms
    return ReserveResult(
        allowed=False, reservation_id="", expires_at_ms=0, input_tokens=req.input_tokens,
        max_output_tokens=0, states=states + hold.states,
        denied_by=hold.states[reply.denied_limit - 1], retry_after_ms=None if retry < 0 else retry)


def _blocked_result(req: ReserveRequest, blocked: Blocked) -> ReserveResult:
    return ReserveResult(allowed=False, reservation_id="", expires_at_ms=0,
                         input_tokens=req.input_tokens, max_output_tokens=0, states=[],
                         retry_after_ms=blocked.retry_after_ms, blocked=blocked)


def _states(subject: Subject, limits: Sequence[Limit], pairs: Sequence[int]
            ) -> list[LimitState]:
    """Limit states from a reply's tail: remaining, reset ms per limit (a shadow limit's
    remaining comes unclamped: below 0, it is over)."""
    states = []
    for k, lim in enumerate(limits):
        remaining = pairs[2 * k]
        # positional, and no max(): this runs for every limit of every call
        states.append(LimitState(lim, subject, remaining if remaining > 0 else 0,
                                 pairs[2 * k + 1], remaining < 0))
    return states
