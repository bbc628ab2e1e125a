"""Cost alerts and anomalies as the quota Lua decides them, through the engine, on real Redis.

Time moves with the test clock; every alert is checked in the call's answer and in the
subject's alert list (what the usage API reads).
"""

from __future__ import annotations

from redis.asyncio import Redis

from ratelimitd.alerts import recent_alerts
from ratelimitd.policy import AnomalyAction, Limit, Prices, Subject
from ratelimitd.quota.engine import Engine
from ratelimitd.quota.model import AnomalySettings, EngineSettings, ReserveRequest
from ratelimitd.store.transport import BatchTransport
from tests.support.clock import Clock
from tests.support.quota import tier_plan

# $1 per 1M input tokens, $0 output: a call of N input tokens costs N x 1000 nano-USD
PRICES = Prices(input=1_000_000, output=0, cached_input=1_000_000)
BUDGET = Limit("daily_budget_usd", "user", "cost_usd", 10**9, "calendar", period="day")
ROOMY = Limit("requests_per_minute", "user", "requests", 10**6, "sliding", window_ms=60_000)
U1 = Subject("user", "u1")
HOUR = 3_600_000
# spike decisions from a subject's first request, a request spike blocking (the seed's rules)
AT_ONCE = AnomalySettings(action="block", min_history_hours=0, block_ms=900_000)


def engine(client: Redis, clock: Clock, **settings: object) -> Engine:
    return Engine.with_test_clock(BatchTransport(client, None), clock,
                                  EngineSettings(**settings))  # type: ignore[arg-type]


async def spend(eng: Engine, tokens: int, *limits: Limit, anomaly: bool | AnomalyAction = False,
                user: str = "u1") -> tuple[list[str], list[str]]:
    """One reserve and commit of `tokens` input tokens; the kinds/thresholds of the alerts of
    each (reserve's, commit's)."""
    res = await eng.reserve(ReserveRequest(tier_plan(*(limits or (BUDGET,)), user=user), tokens,
                                           16, PRICES, min_output_tokens=0, anomaly=anomaly))
    assert res.allowed, (res.denied_by, res.blocked)
    done = await eng.commit(res.reservation_id, tokens, 0)
    return ([a.kind for a in res.alerts],
            [f"{a.kind}:{a.threshold_ppm}" for a in done.alerts])


async def test_each_threshold_fires_once_per_period(redis_client: Redis, clock: Clock) -> None:
    eng = engine(redis_client, clock)
    fired = []
    for _ in range(10):                    # 10 x 10 % of the budget, one at a time
        fired += (await spend(eng, 100_000))[1]
    assert fired == ["cost_threshold:500000", "cost_threshold:800000",
                     "cost_threshold:1000000"]
    listed = await recent_alerts(redis_client, U1)
    assert [a.threshold_ppm for a in listed] == [1_000_000, 800_000, 500_000]
    assert {a.limit for a in listed} == {BUDGET.lid}
    assert [a.severity for a in listed] == ["limit", "critical", "warning"]
    assert listed[2].spend_nano == 5 * 10**8 and listed[2].budget_nano == 10**9
    # the next day is a new period: the thresholds fire again
    clock.advance(86_400_000)
    assert (await spend(eng, 600_000))[1] == ["cost_threshold:500000"]


async def test_an_overrun_fires_every_threshold_it_jumps(redis_client: Redis,
                                                         clock: Clock) -> None:
    eng = engine(redis_client, clock)
    assert (await spend(eng, 400_000))[1] == []
    res = await eng.reserve(ReserveRequest(tier_plan(BUDGET), 100, 16, PRICES,
                                           min_output_tokens=0))
    done = await eng.commit(res.reservation_id, 700_000, 0)      # 40 % -> 110 %
    assert [a.threshold_ppm for a in done.alerts] == [500_000, 800_000, 1_000_000]
    assert done.alerts[2].spend_nano == 11 * 10**8
    again = await eng.commit(res.reservation_id, 700_000, 0)     # a repeat: the same alerts
    assert again.status == "duplicate" and again.alerts == done.alerts
    assert len(await recent_alerts(redis_client, U1)) == 3


async def test_no_thresholds_no_alerts(redis_client: Redis, clock: Clock) -> None:
    eng = engine(redis_client, clock, alert_thresholds=())
    for _ in range(10):
        assert (await spend(eng, 100_000))[1] == []
    assert await recent_alerts(redis_client, U1) == []


async def test_a_sliding_cost_window_alerts_once_per_window_epoch(redis_client: Redis,
                                                                  clock: Clock) -> None:
    hourly = Limit("hourly_usd", "user", "cost_usd", 10**9, "sliding", window_ms=HOUR)
    clock.now = 1_764_000_000_000 - 1_764_000_000_000 % HOUR + 1000
    eng = engine(redis_client, clock, alert_thresholds=(0.5,))
    assert (await spend(eng, 600_000, hourly))[1] == ["cost_threshold:500000"]
    assert (await spend(eng, 100_000, hourly))[1] == []
    clock.advance(HOUR + 120_000)      # the next window epoch, the spend slid out
    assert (await spend(eng, 600_000, hourly))[1] == ["cost_threshold:500000"]


async def test_a_new_subject_sending_five_times_the_default_is_blocked(redis_client: Redis,
                                                                       clock: Clock) -> None:
    clock.now = 1_764_000_000_000 - 1_764_000_000_000 % HOUR + 1000
    eng = engine(redis_client, clock, anomaly=AT_ONCE)
    for _ in range(50):
        reserve_alerts, _ = await spend(eng, 100, ROOMY, anomaly=True)
        assert reserve_alerts == []
        clock.advance(1000)
    res = await eng.reserve(ReserveRequest(tier_plan(ROOMY), 100, 16, PRICES, anomaly=True))
    assert not res.allowed and res.blocked is not None
    assert res.blocked.reason == "request_spike" and res.retry_after_ms == 900_000
    assert [(a.kind, a.severity, a.observed, a.baseline) for a in res.alerts] == \
        [("request_spike", "high", 51, 10)]
    # blocked: answered BLOCKED without alerting again; lifted after block_s, blocked again
    # (the hour is still a spike) and still not alerted twice in the hour
    again = await eng.reserve(ReserveRequest(tier_plan(ROOMY), 100, 16, PRICES, anomaly=True))
    assert again.blocked is not None and again.alerts == []
    clock.advance(900_000)
    third = await eng.reserve(ReserveRequest(tier_plan(ROOMY), 100, 16, PRICES, anomaly=True))
    assert third.blocked is not None and third.alerts == []
    assert [a.kind for a in await recent_alerts(redis_client, U1)] == ["request_spike"]


async def test_a_token_spike_alerts_without_blocking(redis_client: Redis, clock: Clock) -> None:
    clock.now = 1_764_000_000_000 - 1_764_000_000_000 % HOUR + 1000
    eng = engine(redis_client, clock, anomaly=AT_ONCE)
    kinds = []
    for _ in range(6):           # 2 000 tokens a request: 4x the default 500
        kinds += (await spend(eng, 2000, ROOMY, anomaly=True))[0]
    assert kinds == ["token_spike"]           # once 3 commits tell, and once an hour
    [alert] = await recent_alerts(redis_client, U1)
    assert (alert.severity, alert.observed, alert.baseline) == ("medium", 2000, 500)


async def test_the_alert_action_admits_a_request_spike_and_alerts_once_an_hour(
        redis_client: Redis, clock: Clock) -> None:
    clock.now = 1_764_000_000_000 - 1_764_000_000_000 % HOUR + 1000
    eng = engine(redis_client, clock, anomaly=AnomalySettings(min_history_hours=0))
    fired = []
    for _ in range(120):              # each admitted (spend checks it)
        fired += (await spend(eng, 100, ROOMY, anomaly=True))[0]
    assert fired == ["request_spike"]
    [alert] = await recent_alerts(redis_client, U1)
    assert (alert.kind, alert.observed, alert.baseline) == ("request_spike", 51, 10)
    # a tier's own action: "block" blocks under an [anomaly] action of "alert"
    for _ in range(50):
        await spend(eng, 100, ROOMY, anomaly="block", user="u2")
    res = await eng.reserve(ReserveRequest(tier_plan(ROOMY, user="u2"), 100, 16, PRICES,
                                           anomaly="block"))
    assert res.blocked is not None and res.blocked.reason == "request_spike"


async def test_no_spike_decision_before_min_history_hours(redis_client: Redis,
                                                         clock: Clock) -> None:
    clock.now = 1_764_000_000_000 - 1_764_000_000_000 % HOUR + 1000
    eng = engine(redis_client, clock, anomaly=AnomalySettings(action="block"))   # 24 hours
    for _ in range(23):               # 23 active hours of 10 requests of 500 tokens
        for _ in range(10):
            assert (await spend(eng, 500, ROOMY, anomaly=True))[0] == []
        clock.advance(HOUR)
    for _ in range(80):               # the 24th hour: 8x as many, 4x the tokens; undecided
        assert (await spend(eng, 2000, ROOMY, anomaly=True))[0] == []
    assert await recent_alerts(redis_client, U1) == []
    clock.advance(HOUR)               # 24 active hours: judged by its own baseline now
    kinds: list[str] = []
    for _ in range(5):
        kinds += (await spend(eng, 4000, ROOMY, anomaly=True))[0]
    assert kinds == ["token_spike"]
    for n in range(100):
        res = await eng.reserve(ReserveRequest(tier_plan(ROOMY), 100, 16, PRICES, anomaly=True))
        if res.blocked is not None:
            break
    [spike] = [a for a in await recent_alerts(redis_client, U1) if a.kind == "request_spike"]
    # the 24th hour moved the baseline by a clipped sample: 10 + (20 - 10) / 8
    assert (spike.baseline, spike.observed, 5 + n + 1) == (11, 57, 57)


async def test_a_steady_subject_neither(redis_client: Redis, clock: Clock) -> None:
    clock.now = 1_764_000_000_000 - 1_764_000_000_000 % HOUR + 1000
    eng = engine(redis_client, clock)
    for _ in range(24 * 10):      # 10 requests of 500 tokens an hour, for a day
        assert (await spend(eng, 500, ROOMY, anomaly=True))[0] == []
        clock.advance(HOUR // 10)
    assert await recent_alerts(redis_client, U1) == []


async def test_anomaly_off_counts_nothing(redis_client: Redis, clock: Clock) -> None:
    eng = engine(redis_client, clock)
    for _ in range(60):
        await spend(eng, 100, ROOMY, anomaly=False)
    assert not await redis_client.hget("rl:{user:u1}", "n")    # absent, or the empty placeholder
