"""Property: the engine never over-admits and admits whenever there is room.

Hypothesis draws random sequences of reserves (alone, or several at once over two engines on
their own connections), commits, releases, repeated settles and clock moves (small steps,
window-sized waits, jumps over local midnight and daylight-saving days) against one user with
every kind of limit: a sliding requests limit, a sliding tokens limit, a calendar-day cost
budget (America/New_York), a token bucket on tokens and a concurrency limit. Some reservations
are never settled and expire.

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
from dataclasses import dataclass
from datetime import date, datetime
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from ratelimitd.engine import Engine, EngineSettings, Prices, ReserveRequest, ReserveResult
from ratelimitd.policy import Identity, Limit, Tier, plan, sliding
from tests.conftest import Clock
from tests.redis_servers import RedisServer

TZ = "America/New_York"
NY = ZoneInfo(TZ)
WINDOW = 60_000
SUB = WINDOW // 60                  # one sub-bucket of the sliding windows
REQUESTS = 5                        # per sliding minute
TOKENS = 1_500                      # per sliding minute
BUDGET = 15_000_000                 # nano-USD per local day ($0.015)
RATE, BURST = 1_000, 1_200          # token bucket: 1000 tokens a minute (one per 60 ms)
CONCURRENT = 3
TTL = 30_000                        # reservation TTL; the concurrency window is this long
TTL_SUB = TTL // 60
MIN_OUT = 16
# odd prices, so that cost rounding matters (micro-USD per 1M tokens)
PRICES = Prices(input=2_999_999, output=15_000_001, cached_input=1_000_003)

LIMITS = (
    sliding("requests", "requests", "60s", REQUESTS),
    sliding("tokens", "tokens", "60s", TOKENS),
    Limit("budget", "user", "cost_usd", BUDGET, "calendar", period="day"),
    Limit("bucket", "user", "tokens", RATE, "token_bucket", window_ms=WINDOW, burst=BURST),
    Limit("concurrent", "user", "concurrent", CONCURRENT, "sliding"),
)
PLAN = plan(Tier("small", LIMITS), Identity("u1", "small"))


def cost_nano(inp: int, out: int, cached: int = 0) -> int:
    num = (inp - cached) * PRICES.input + cached * PRICES.cached_input + out * PRICES.output
    return -(-num // 1000)


def local_day(ms: int) -> date:
    return datetime.fromtimestamp(ms / 1000, NY).date()


def local_ms(*parts: int) -> int:
    return int(datetime(*parts, tzinfo=NY).timestamp()) * 1000  # type: ignore[misc]


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


class Model:
    def __init__(self, now: int) -> None:
        self.calls: list[Call] = []
        self.level = Fraction(BURST)   # the token bucket, refilled continuously
        self.level_at = now

    def refill(self, now: int) -> None:
        self.level = min(Fraction(BURST), self.level + Fraction((now - self.level_at) * RATE,
                                                                  WINDOW))
        self.level_at = now

    def window(self, now: int, span: int, field: str) -> int:
        return sum(getattr(c, field) for c in self.calls if now - span < c.at <= now)

    def day_cost(self, now: int) -> int:
        day = local_day(now)
        return sum(c.cost for c in self.calls if local_day(c.at) == day)

    def in_flight(self, now: int, slack: int = 0) -> int:
        return sum(1 for c in self.calls if c.state == "open" and c.expires > now - slack)

    def room(self, now: int, inp: int, cap: int) -> tuple[int, set[str]]:
        """The output a call surely fits with (sliding windows and the concurrency window
        counted one sub-bucket longer), and the limits where not even the minimum fits."""
        self.refill(now)
        floor_out = min(MIN_OUT, cap)
        fits = {
            "requests": cap if self.window(now, WINDOW + SUB, "requests") + 1 <= REQUESTS
            else -1,
            "tokens": TOKENS - self.window(now, WINDOW + SUB, "tokens") - inp,
            "budget": ((BUDGET - self.day_cost(now)) * 1000 - inp * PRICES.input)
            // PRICES.output,
            "bucket": int(self.level) - inp,
            "concurrent": cap if self.in_flight(now, TTL_SUB) + 1 <= CONCURRENT else -1,
        }
        return min(cap, *fits.values()), {k for k, v in fits.items() if v < floor_out}

    def admit(self, now: int, inp: int, cap: int, res: ReserveResult) -> None:
        g = res.max_output_tokens
        assert min(MIN_OUT, cap) <= g <= cap
        call = Call(res.reservation_id, now, res.expires_at_ms, inp, g, inp + g,
                    cost_nano(inp, g))
        assert res.expires_at_ms == now + TTL
        self.refill(now)
        assert call.tokens <= self.level, f"bucket holds {self.level}, admitted {call.tokens}"
        self.level -= call.tokens
        self.calls.append(call)

    def check_limits(self, now: int) -> None:
        """(a): what was reserved plus what was committed, in every window ending now."""
        requests = self.window(now, WINDOW, "requests")
        tokens = self.window(now, WINDOW, "tokens")
        assert requests <= REQUESTS, f"{requests} requests in the last minute"
        assert tokens <= TOKENS, f"{tokens} tokens in the last minute"
        assert self.day_cost(now) <= BUDGET, f"{self.day_cost(now)} nano-USD today"
        assert self.in_flight(now) <= CONCURRENT, f"{self.in_flight(now)} calls in flight"

    def settle(self, now: int, call: Call, inp: int, cached: int, out: int, state: str) -> None:
        tokens, cost = inp + out, cost_nano(inp, out, cached)
        self.refill(now)
        self.level = min(Fraction(BURST), self.level + call.tokens - tokens)
        call.tokens, call.cost, call.state = tokens, cost, state
        if state == "released":
            call.requests = 0


async def snapshot(client: Redis) -> dict[bytes, bytes | None]:
    return {k: await client.dump(k) for k in sorted([k async for k in client.scan_iter()])}


async def run_ops(url: str, start: int, ops: list[tuple[Any, ...]]) -> None:
    clients = [Redis.from_url(url), Redis.from_url(url)]
    try:
        await clients[0].flushall()
        clock = Clock(start)
        engines = [Engine.with_test_clock(c, clock, EngineSettings(reservation_ttl_ms=TTL,
                                                                   timezone=TZ))
                   for c in clients]
        model = Model(start)
        for op in ops:
            await step(op, clock, engines, clients[0], model)
    finally:
        for c in clients:
            await c.aclose()


async def step(op: tuple[Any, ...], clock: Clock, engines: list[Engine], client: Redis,
               model: Model) -> None:
    kind, now = op[0], clock.now
    note(f"t={now - model.calls[0].at if model.calls else 0} {op}")
    if kind == "advance":
        clock.advance(op[1])
    elif kind == "reserve":
        _, inp, cap, which = op
        sure, denying = model.room(now, inp, cap)
        res = await engines[which].reserve(ReserveRequest(PLAN, inp, cap, PRICES))
        if res.allowed:
            model.admit(now, inp, cap, res)
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
            assert res.retry_after_ms is not None and res.retry_after_ms > 0
    elif kind == "burst":
        calls = op[1]
        results = await asyncio.gather(*(
            engines[k % 2].reserve(ReserveRequest(PLAN, inp, cap, PRICES))
            for k, (inp, cap) in enumerate(calls)))
        for (inp, cap), res in zip(calls, results, strict=True):
            if res.allowed:
                model.admit(now, inp, cap, res)
        model.check_limits(now)
        # room only shrank during the burst: a denied call cannot fit even now
        for (inp, cap), res in zip(calls, results, strict=True):
            if not res.allowed:
                denying = model.room(now, inp, cap)[1]
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
    st.integers(3_000, 70_000), st.integers(3_000, 70_000),
    st.integers(3_600_000, 26 * 3_600_000)))
_ops = st.one_of(
    _reserve, _reserve, _reserve,
    st.tuples(st.just("burst"), st.lists(_size, min_size=2, max_size=6)),
    _commit, _commit,
    st.tuples(st.just("release"), st.integers(0, 99)),
    st.tuples(st.just("again"), st.integers(0, 99), st.booleans()),
    _advance, _advance,
)
_starts = st.sampled_from([
    local_ms(2025, 11, 1, 23, 50),      # the night before the 25-hour day (fall back)
    local_ms(2025, 11, 2, 23, 40),      # the end of the 25-hour day
    local_ms(2026, 3, 7, 23, 50),       # the night before the 23-hour day (spring forward)
    local_ms(2026, 3, 8, 23, 40),
    local_ms(2025, 11, 24, 23, 45),
    local_ms(2025, 11, 24, 12, 0),
]).flatmap(lambda t: st.integers(t, t + 20 * 60_000))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(start=_starts, ops=st.lists(_ops, min_size=20, max_size=80))
def test_engine_never_over_admits_and_admits_when_there_is_room(
    redis_server: RedisServer, start: int, ops: list[tuple[Any, ...]]
) -> None:
    asyncio.run(run_ops(redis_server.url, start, ops))
