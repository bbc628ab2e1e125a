"""Shared helpers of the quota tests (tests/quota/): plans, requests, engines on a test clock,
and reading what each limit has left."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from redis.asyncio import Redis

from ratelimitd.policy import (
    Identity,
    Limit,
    Prices,
    Subject,
    Tier,
    plan,
)
from ratelimitd.quota.engine import Engine
from ratelimitd.quota.ids import SEAL_REDIS_KEY
from ratelimitd.quota.model import EngineSettings, ReserveRequest, ReserveResult
from ratelimitd.store.transport import BatchTransport
from tests.support.clock import Clock

# $3 / $15 per 1M tokens (cached input $1.5): micro-USD per 1M tokens.
PRICES = Prices(input=3_000_000, output=15_000_000, cached_input=1_500_000)
MINUTE = 60_000
SUB = MINUTE // 60          # one sub-bucket of a 60 s sliding window
NY = ZoneInfo("America/New_York")
UTC = ZoneInfo("UTC")

Plan = list[tuple[Subject, list[Limit]]]


def cost_nano(inp: int, out: int, prices: Prices = PRICES, cached: int = 0) -> int:
    """Nano-USD of a call: tokens x (micro-USD per 1M tokens) / 1000, rounded up."""
    num = (inp - cached) * prices.input + cached * prices.cached_input + out * prices.output
    return -(-num // 1000)


def tier_plan(*limits: Limit, user: str = "u1", org: str | None = None) -> Plan:
    return plan(Tier("t", tuple(limits)), Identity(user, "t", org=org))


def rq(p: Plan, inp: int = 100, out: int = 100, **kw: object) -> ReserveRequest:
    return ReserveRequest(p, inp, out, PRICES, **kw)  # type: ignore[arg-type]


def engine_on(client: Redis, settings: EngineSettings | None = None) -> Engine:
    """An engine on Redis time whose calls go through redis-py (tests share one client)."""
    return Engine(BatchTransport(client, None), settings)


def make_engine(client: Redis, clock: Clock, **settings: object) -> Engine:
    return Engine.with_test_clock(BatchTransport(client, None), clock,
                                  EngineSettings(**settings))  # type: ignore[arg-type]


def calendar_budget(nano: int, name: str = "daily_budget", scope: str = "user") -> Limit:
    return Limit(name, scope, "cost_usd", nano, "calendar", period="day")


def concurrent(n: int, name: str = "max_concurrent") -> Limit:
    return Limit(name, "user", "concurrent", n, "sliding")


def bucket(rate: int, burst: int, metric: str = "requests", name: str = "bucket") -> Limit:
    return Limit(name, "user", metric, rate, "token_bucket",  # type: ignore[arg-type]
                 window_ms=MINUTE, burst=burst)


def local_ms(tz: ZoneInfo, y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> int:
    return int(datetime(y, mo, d, h, mi, s, tzinfo=tz).timestamp()) * 1000


async def snapshot(client: Redis) -> dict[bytes, tuple[object, object]]:
    """Every key with its type and serialized value: equal snapshots mean nothing changed."""
    keys = sorted([k async for k in client.scan_iter(count=1000)
                   if k != SEAL_REDIS_KEY.encode()])   # the id secret is made once, not a charge
    return {k: (await client.type(k), await client.dump(k)) for k in keys}


async def left(engine: Engine, p: Plan) -> dict[str, int]:
    """What each limit has left, by `scope:name`, read with dry runs (they reserve nothing).

    Each subject is asked on its own, so a denying subject cannot hide another's state. A dry
    run answers as if it had reserved one request and one slot (0 tokens, 0 cost); that is
    added back when it was allowed.
    """
    out: dict[str, int] = {}
    for subject, limits in p:
        if not limits:
            continue
        res = await engine.reserve(ReserveRequest([(subject, limits)], 0, 0, PRICES,
                                                  min_output_tokens=0, dry_run=True))
        for state in res.states:
            charged = res.allowed and state.limit.metric in ("requests", "concurrent")
            out[f"{subject.scope}:{state.limit.name}"] = state.remaining + int(charged)
    return out


def state_of(res: ReserveResult, name: str) -> tuple[int, int]:
    [state] = [s for s in res.states if s.limit.name == name]
    return state.remaining, state.reset_ms


def reason(res: ReserveResult) -> str | None:
    return None if res.denied_by is None else res.denied_by.limit.name


