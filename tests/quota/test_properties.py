"""Property: the engine never over-admits and admits whenever there is room.

Hypothesis draws random sequences of reserves (alone, or several at once over two engines on
their own connections), commits, releases, repeated settles and clock moves (small steps,
window-sized waits, moves to just before or after a call leaves a window or expires, jumps
over local midnight and daylight-saving days) against one user with a small tier: a sliding
requests limit, a sliding tokens limit (60 s), a calendar-day cost budget (America/New_York), a
token bucket on tokens and a concurrency limit; in some examples all of them with fixed sizes,
in others a random subset with random sizes, so that each one binds on its own too. Some
reservations are never settled and expire; the reservation TTL (90 s) is longer than the
windows, so some commits come after their sub-bucket slid out.

The machine also steps Redis time back (up to a day, so across local midnight) and forward
again, runs the second engine with another reservation TTL (a rolling config change; 100 s
makes the concurrency sub-buckets fractional), and fails a chosen call of a reserve or a commit
(tests/support/faults.py's FaultyTransport around the real transport): before Redis runs it or
after (the reply lost). A second subject (global, ample) makes the reserve cross two slots, so
a failure can cut it short between them. The engine keeps counting a stepped-back limit at the
newest time it stored it at (sub-bucket, period, refill time): the model counts each call, on
each limit, at that time (`Model.stored`: when the engine last wrote the limit), so (a) below
holds across steps back; (b) is not checked once time has stepped back in an example. With
two TTLs, max_concurrent is checked per TTL (daemons with different ttl_s keep separate
concurrency states: quota/calls.py's concurrency_lid). A failed reserve must charge nothing
once the engine's compensator has drained, which (b) catches as a needless denial; a commit
whose reply was lost is retried, as a gateway does.

A reference model in Python keeps every admitted call with its timestamp and its amounts, as
commits and releases change them, and checks, at every admission time t:
  (a) no over-admission: the sum over (t - window, t] of every sliding limit, the day's cost,
      the calls in flight and the token bucket's level stay within their limits;
  (b) no needless denial: if the call fits on every limit even when the sliding windows count
      one more sub-bucket of history, (t - window - window/60, t] (the documented bound of
      invariant 6), the engine admits it, with at least the output the model says fits.
Each example runs on a freshly flushed real redis-server, in its own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, field
from datetime import date, datetime
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from ratelimitd.errors import StoreUnavailable
from ratelimitd.policy import Identity, Limit, Prices, Subject, Tier, plan, sliding
from ratelimitd.quota import wire
from ratelimitd.quota.engine import Engine
from ratelimitd.quota.ids import SEAL_REDIS_KEY
from ratelimitd.quota.model import EngineSettings, ReserveRequest, ReserveResult
from ratelimitd.store.transport import BatchTransport
from tests.support.clock import Clock
from tests.support.fault_load import drained
from tests.support.faults import FaultyTransport, on
from tests.support.redis_servers import RedisServer

TZ = "America/New_York"
NY = ZoneInfo(TZ)
WINDOW = 60_000
SUB = WINDOW // 60                  # one sub-bucket of the sliding windows
# reservation TTL (the concurrency window is this long); longer than the sliding windows, so
# that some commits come after their sub-bucket slid out
TTL = 90_000
MIN_OUT = 16
# odd prices, so that cost rounding matters (micro-USD per 1M tokens)
PRICES = Prices(input=2_999_999, output=15_000_001, cached_input=1_000_003)
LIMIT_KEYS = ("requests", "tokens", "budget")     # the limits a step back can shift


@dataclass(frozen=True)
class Quota:
    """The small tier of one example; None: no such limit."""

    requests: int | None = 5        # sliding minute
    tokens: int | None = 1_500      # sliding minute
    budget: int | None = 15_000_000  # nano-USD per local day
    rate: int = 1_000               # token bucket on tokens: refill per minute (divides 60000)
    burst: int | None = 1_200
    concurrent: int | None = 3

    def plan(self) -> list[tuple[Subject, list[Limit]]]:
        limits = []
        if self.requests is not None:
            limits.append(sliding("requests", "requests", "60s", self.requests))
        if self.tokens is not None:
            limits.append(sliding("tokens", "tokens", "60s", self.tokens))
        if self.budget is not None:
            limits.append(Limit("budget", "user", "cost_usd", self.budget, "calendar",
                                period="day"))
        if self.burst is not None:
            limits.append(Limit("bucket", "user", "tokens", self.rate, "token_bucket",
                                window_ms=WINDOW, burst=self.burst))
        if self.concurrent is not None:
            limits.append(Limit("concurrent", "user", "concurrent", self.concurrent, "sliding"))
        # a second subject, never the one that denies: a reserve crosses two slots
        limits.append(sliding("global_rq", "requests", "60s", 10**9, scope="global"))
        return plan(Tier("small", tuple(limits)), Identity("u1", "small"))


def cost_nano(inp: int, out: int, cached: int = 0) -> int:
    num = (inp - cached) * PRICES.input + cached * PRICES.cached_input + out * PRICES.output
    return -(-num // 1000)


def local_day(ms: int) -> date:
    return datetime.fromtimestamp(ms / 1000, NY).date()


def local_ms(y: int, mo: int, d: int, h: int = 0, mi: int = 0) -> int:
    return int(datetime(y, mo, d, h, mi, tzinfo=NY).timestamp()) * 1000


@dataclass
class Call:
    rid: str
    at: int
    expires: int
    input: int
    granted: int
    tokens: int
    cost: int
    requests: int = 1
    state: str = "open"             # open | committed | released
    ttl: int = TTL                  # of the engine that reserved it
    # per limit (requests, tokens, budget): the Redis time the engine counts it at
    eff: dict[str, int] = field(default_factory=dict)


class Model:
    def __init__(self, quota: Quota, now: int) -> None:
        self.q = quota
        self.plan = quota.plan()
        self.calls: list[Call] = []
        self.level = Fraction(quota.burst or 0)  # the token bucket, refilled continuously
        self.level_at = now
        self.stepped_back = False       # Redis time went back in this example: (b) is off
        self.hwm = now                  # the latest Redis time so far
        # per limit: the newest time the engine wrote it at (a write never moves it back)
        self.stored = dict.fromkeys((*LIMIT_KEYS, "bucket"), 0)

    def tick(self, now: int) -> None:
        """Redis time is `now` (an op starts): the bucket refills, the high-water mark moves."""
        self.hwm = max(self.hwm, now)
        self.refill(now)

    def eff(self, key: str, now: int) -> int:
        """The time the engine counts limit `key` at, at Redis time `now`."""
        return max(now, self.stored[key])

    def wrote(self, now: int,
              keys: tuple[str, ...] = ("requests", "tokens", "budget", "bucket")) -> None:
        for key in keys:
            self.stored[key] = self.eff(key, now)

    def refill(self, now: int) -> None:
        # time that went back refills nothing, and is not refilled again once it is back;
        # a full bucket refills from the time the engine counts it at
        t = self.eff("bucket", now)
        if self.q.burst is not None and t > self.level_at:
            self.level = min(Fraction(self.q.burst),
                             self.level + Fraction((t - self.level_at) * self.q.rate, WINDOW))
        full = self.q.burst is None or self.level >= self.q.burst
        self.level_at = t if full else max(self.level_at, t)

    def window(self, now: int, span: int, field: str) -> int:
        t = self.eff(field, now)
        return sum(getattr(c, field) for c in self.calls if t - span < c.eff[field] <= t)

    def day_cost(self, now: int) -> int:
        day = local_day(self.eff("budget", now))
        return sum(c.cost for c in self.calls if local_day(c.eff["budget"]) == day)

    def in_flight(self, now: int, slack: int = 0, ttl: int = TTL) -> int:
        return sum(1 for c in self.calls
                   if c.state == "open" and c.expires > now - slack and c.ttl == ttl)

    def room(self, now: int, inp: int, cap: int, ttl: int = TTL) -> tuple[int, set[str]]:
        """The output a call surely fits with (sliding windows and the concurrency window
        counted one sub-bucket longer), and the limits where not even the minimum fits."""
        q = self.q
        self.refill(now)
        floor_out = min(MIN_OUT, cap)
        fits = {}
        if q.requests is not None:
            used = self.window(now, WINDOW + SUB, "requests")
            fits["requests"] = cap if used + 1 <= q.requests else -1
        if q.tokens is not None:
            fits["tokens"] = q.tokens - self.window(now, WINDOW + SUB, "tokens") - inp
        if q.budget is not None:
            left = q.budget - self.day_cost(now)
            fits["budget"] = (left * 1000 - inp * PRICES.input) // PRICES.output
        if q.burst is not None:
            fits["bucket"] = int(self.level) - inp
        if q.concurrent is not None:
            used = self.in_flight(now, -(-ttl // 60), ttl)
            fits["concurrent"] = cap if used + 1 <= q.concurrent else -1
        return min([cap, *fits.values()]), {k for k, v in fits.items() if v < floor_out}

    def never_fits(self, inp: int, cap: int) -> bool:
        """Even an idle user could not make this call: the engine must not say when to retry."""
        q, need = self.q, inp + min(MIN_OUT, cap)
        return ((q.tokens is not None and need > q.tokens)
                or (q.budget is not None and cost_nano(inp, min(MIN_OUT, cap)) > q.budget)
                or (q.burst is not None and need > q.burst))

    def admit(self, now: int, inp: int, cap: int, res: ReserveResult, ttl: int = TTL) -> None:
        g = res.max_output_tokens
        assert min(MIN_OUT, cap) <= g <= cap
        call = Call(res.reservation_id, now, res.expires_at_ms, inp, g, inp + g,
                    cost_nano(inp, g), ttl=ttl,
                    eff={key: self.eff(key, now) for key in LIMIT_KEYS})
        self.wrote(now)                 # a grant writes every limit
        assert res.expires_at_ms == now + ttl
        assert res.reserved_cost_nano == call.cost
        self.refill(now)
        if self.q.burst is not None:
            assert call.tokens <= self.level, f"bucket had {self.level}, gave {call.tokens}"
            self.level -= call.tokens
        self.calls.append(call)

    def check_limits(self, now: int) -> None:
        """(a): what was reserved plus what was committed, in every window ending now."""
        q = self.q
        requests = self.window(now, WINDOW, "requests")
        tokens = self.window(now, WINDOW, "tokens")
        assert q.requests is None or requests <= q.requests, f"{requests} requests a minute"
        assert q.tokens is None or tokens <= q.tokens, f"{tokens} tokens in a minute"
        cost = self.day_cost(now)
        assert q.budget is None or cost <= q.budget, f"{cost} nano-USD today"
        for ttl in {c.ttl for c in self.calls}:
            # a reservation is gone once Redis time passed its expiry, even if it went back
            flying = self.in_flight(self.hwm, 0, ttl)
            assert q.concurrent is None or flying <= q.concurrent, f"{flying} calls in flight"

    def settle(self, now: int, call: Call, inp: int, cached: int, out: int, state: str) -> None:
        tokens, cost = inp + out, cost_nano(inp, out, cached)
        deltas = {"requests": -1 if state == "released" else 0, "tokens": tokens - call.tokens,
                  "budget": cost - call.cost}
        for key, delta in deltas.items():
            t = self.eff(key, now)
            if key == "budget":
                dropped = delta < 0 and local_day(call.eff[key]) != local_day(t)
            else:   # a refund for a sub-bucket that slid out
                dropped = delta < 0 and call.eff[key] // SUB < t // SUB - 60
            if delta != 0 and not dropped:
                self.wrote(now, (key,))
        self.refill(now)
        if call.tokens != tokens:
            self.wrote(now, ("bucket",))
        if self.q.burst is not None:
            self.level = min(Fraction(self.q.burst), self.level + call.tokens - tokens)
        call.tokens, call.cost, call.state = tokens, cost, state
        if state == "released":
            call.requests = 0


async def snapshot(client: Redis) -> dict[bytes, bytes | None]:
    keys = [k async for k in client.scan_iter() if k != SEAL_REDIS_KEY.encode()]
    return {k: await client.dump(k) for k in sorted(keys)}


async def run_ops(url: str, quota: Quota, start: int, ttl2: int,
                  ops: list[tuple[Any, ...]]) -> None:
    clients = [Redis.from_url(url), Redis.from_url(url)]
    try:
        await clients[0].flushall()
        clock = Clock(start)
        faulty = FaultyTransport(BatchTransport(clients[0], None))
        engines = [Engine.with_test_clock(transport, clock, EngineSettings(
                       reservation_ttl_ms=ttl, timezone=TZ))
                   for transport, ttl in ((faulty, TTL), (BatchTransport(clients[1], None), ttl2))]
        model = Model(quota, start)
        for op in ops:
            if op[0] == "fault":
                await fault(op, clock, engines[0], faulty, model)
            else:
                await step(op, clock, engines, clients[0], model)
        for engine in engines:
            await engine.aclose()
    finally:
        for c in clients:
            await c.aclose()


async def fault(op: tuple[Any, ...], clock: Clock, engine: Engine, faulty: FaultyTransport,
                model: Model) -> None:
    """A reserve or a commit whose call on one subject fails, before or after Redis ran it."""
    _, kind, index, when, inp, cap, pick = op
    now, tag = clock.now, model.plan[index][0].tag
    note(f"t={now} {op}")
    model.tick(now)
    if kind == "reserve":
        armed = faulty.fail(on(tag, "reserve"), when)
        try:
            res = await engine.reserve(ReserveRequest(model.plan, inp, cap, PRICES))
        except StoreUnavailable:
            event(f"reserve failed {when} its call on {tag}")
            lost = faulty.lost_replies[-1] if when == "after" and index == 0 else None
            if index == 1 or (lost is not None and
                              wire.decode_reserve(lost).status == wire.ReserveStatus.RESERVED):
                model.wrote(now)                # the user granted it (then it was cancelled)
            await drained([engine], 5.0)       # its charges cancelled: (b) checks it later
        else:
            assert not res.allowed, "a reserve whose call failed was allowed"
        armed.times = 0
        return
    live = [c for c in model.calls if c.state == "open" and c.expires > now]
    if not live:
        return
    call = live[pick % len(live)]
    armed = faulty.fail(on(tag, "settle"), when)
    with contextlib.suppress(StoreUnavailable):
        await engine.commit(call.rid, call.input, call.granted // 2)
    assert armed.times == 0, "the commit did not reach the subject"
    res = await engine.commit(call.rid, call.input, call.granted // 2)     # the gateway retries
    # the first try applied it on the user unless it failed there before Redis ran it
    assert res.status == ("applied" if index == 0 and when == "before" else "duplicate")
    event(f"commit failed {when} its call on {tag}, retried")
    model.settle(now, call, call.input, 0, call.granted // 2, "committed")


async def step(op: tuple[Any, ...], clock: Clock, engines: list[Engine], client: Redis,
               model: Model) -> None:
    kind, now = op[0], clock.now
    ttls = [TTL, engines[1].settings.reservation_ttl_ms]
    model.tick(now)
    note(f"t={now - model.calls[0].at if model.calls else 0} {op}")
    if kind == "advance":
        clock.advance(op[1])
    elif kind == "back":
        clock.advance(-op[1])                  # Redis time steps back (a failover, NTP)
        model.stepped_back = True
    elif kind == "edge":
        # to just before or after a call leaves a sliding window or its reservation expires
        if model.calls:
            call = model.calls[op[1] % len(model.calls)]
            clock.now = max(now, call.at + (call.ttl if op[2] else WINDOW) + op[3])
    elif kind == "reserve":
        _, inp, cap, which = op
        sure, denying = model.room(now, inp, cap, ttls[which])
        res = await engines[which].reserve(ReserveRequest(model.plan, inp, cap, PRICES))
        if model.stepped_back:
            if res.allowed:
                model.admit(now, inp, cap, res, ttls[which])
                model.check_limits(now)
        elif res.allowed:
            model.admit(now, inp, cap, res, ttls[which])
            model.check_limits(now)
            event("admitted" if not denying else "admitted within the bound")
            if res.max_output_tokens < cap:
                event("admitted, output cut to what fits")
            if not denying:
                assert res.max_output_tokens >= sure, f"granted {res.max_output_tokens} < {sure}"
        else:
            for name in sorted(denying):
                event(f"denied, {name} full")
            assert denying, f"denied by {res.denied_by} although the call fits"
            assert res.denied_by is not None and res.denied_by.limit.name in denying
            if model.never_fits(inp, cap):
                assert res.retry_after_ms is None
            else:
                assert res.retry_after_ms is not None and res.retry_after_ms > 0
    elif kind == "burst":
        calls = op[1]
        results = await asyncio.gather(*(
            engines[k % 2].reserve(ReserveRequest(model.plan, inp, cap, PRICES))
            for k, (inp, cap) in enumerate(calls)))
        for k, ((inp, cap), res) in enumerate(zip(calls, results, strict=True)):
            if res.allowed:
                model.admit(now, inp, cap, res, ttls[k % 2])
        model.check_limits(now)
        # room only shrank during the burst: a denied call cannot fit even now
        for k, ((inp, cap), res) in enumerate(zip(calls, results, strict=True)):
            if not res.allowed and not model.stepped_back:
                denying = model.room(now, inp, cap, ttls[k % 2])[1]
                assert denying, f"{(inp, cap)} denied although it fits"
                assert res.denied_by is not None and res.denied_by.limit.name in denying
    elif kind in ("commit", "release"):
        live = [c for c in model.calls if c.state == "open" and c.expires > now]
        if not live:
            return
        call = live[op[1] % len(live)]
        if kind == "commit":
            inp = call.input * op[2] // 100
            out = call.granted * op[3] // 100
            cached = inp * op[4] // 100
            res = await engines[0].commit(call.rid, inp, out, cached_input_tokens=cached)
            assert res.status == "applied"
            assert res.cost_nano == cost_nano(inp, out, cached)
            assert (res.reserved_tokens, res.reserved_cost_nano) == (call.tokens, call.cost)
            model.settle(now, call, inp, cached, out, "committed")
        else:
            assert (await engines[0].release(call.rid)).status == "applied"
            model.settle(now, call, 0, 0, 0, "released")
    elif kind == "again":
        done = [c for c in model.calls if c.state != "open"]
        if not done:
            return
        call = done[op[1] % len(done)]
        before = await snapshot(client)
        if op[2]:
            res = await engines[1].commit(call.rid, call.input, call.granted)
            expected = "duplicate" if call.state == "committed" else "conflict"
        else:
            res = await engines[1].release(call.rid)
            expected = "duplicate" if call.state == "released" else "conflict"
        assert res.status == expected
        assert await snapshot(client) == before


_input = st.integers(0, 800)
_cap = st.one_of(st.integers(1, 40), st.integers(16, 1200))
_size = st.tuples(_input, _cap)
_reserve = st.tuples(st.just("reserve"), _input, _cap, st.integers(0, 1))
_commit = st.tuples(st.just("commit"), st.integers(0, 99), st.integers(0, 100),
                    st.integers(0, 100), st.integers(0, 100))
_advance = st.tuples(st.just("advance"), st.one_of(
    st.integers(0, 3_000), st.integers(0, 3_000), st.integers(0, 3_000),
    st.integers(3_000, 70_000), st.integers(WINDOW - 2 * SUB, WINDOW + 2 * SUB),
    st.integers(3_600_000, 26 * 3_600_000)))
_ops = st.one_of(
    _reserve, _reserve, _reserve,
    st.tuples(st.just("burst"), st.lists(_size, min_size=2, max_size=6)),
    _commit, _commit,
    st.tuples(st.just("release"), st.integers(0, 99)),
    st.tuples(st.just("again"), st.integers(0, 99), st.booleans()),
    _advance, _advance,
    st.tuples(st.just("back"), st.one_of(st.integers(1, 3_000), st.integers(3_000, 70_000),
                                         st.integers(3_600_000, 26 * 3_600_000))),
    st.tuples(st.just("fault"), st.sampled_from(["reserve", "commit"]), st.integers(0, 1),
              st.sampled_from(["before", "after"]), _input, _cap, st.integers(0, 99)),
    st.tuples(st.just("edge"), st.integers(0, 99), st.booleans(),
              st.integers(-2 * SUB, 2 * SUB)),
)


def _maybe(values: st.SearchStrategy[int]) -> st.SearchStrategy[int | None]:
    return st.one_of(values, values, st.none())   # present in about two examples of three


_quotas = st.one_of(
    st.just(Quota()),                  # every kind of limit at once
    st.builds(Quota, requests=_maybe(st.integers(1, 10)),
              tokens=_maybe(st.integers(200, 4_000)),
              budget=_maybe(st.integers(1_000_000, 40_000_000)),
              rate=st.sampled_from([600, 1_000, 1_500, 6_000]),
              burst=_maybe(st.integers(100, 3_000)),
              concurrent=_maybe(st.integers(1, 5))),
)
_starts = st.sampled_from([
    local_ms(2025, 11, 1, 23, 50),      # the night before the 25-hour day (fall back)
    local_ms(2025, 11, 2, 23, 40),      # the end of the 25-hour day
    local_ms(2026, 3, 7, 23, 50),       # the night before the 23-hour day (spring forward)
    local_ms(2026, 3, 8, 23, 40),
    local_ms(2025, 11, 24, 23, 45),
    local_ms(2025, 11, 24, 12, 0),
]).flatmap(lambda t: st.integers(t, t + 20 * 60_000))


# New random examples each run; RATELIMITD_HYPOTHESIS_EXAMPLES=5000 (say) searches longer. A
# failure prints its shrunk example and the @reproduce_failure line that replays it.
EXAMPLES = int(os.environ.get("RATELIMITD_HYPOTHESIS_EXAMPLES", "200"))


@settings(max_examples=EXAMPLES, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(quota=_quotas, start=_starts, ops=st.lists(_ops, min_size=20, max_size=80),
       # the second engine's reservation TTL: mostly the first's, else a rolling change
       ttl2=st.sampled_from([TTL, TTL, TTL, 45_000, 100_000]))
def test_engine_never_over_admits_and_admits_when_there_is_room(
    redis_server: RedisServer, quota: Quota, start: int, ttl2: int, ops: list[tuple[Any, ...]]
) -> None:
    asyncio.run(run_ops(redis_server.url, quota, start, ttl2, ops))
