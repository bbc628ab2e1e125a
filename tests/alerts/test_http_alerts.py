"""Cost alerts, anomalies and the usage API through real daemons (real sockets, real Redis)
and a real webhook receiver (an aiohttp server on a free loopback port).

Prices: model `m` costs $1 per 1M input tokens and nothing for output, so a call of N input
tokens spends N x 1000 nano-USD, and the $1 daily budget is 1M tokens.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from ratelimitd.abuse.blocks import INDEX_KEY
from ratelimitd.alerts import OUTBOX_KEY, verify_webhook_signature
from ratelimitd.cli.main import main as cli_main
from ratelimitd.cli.usage_report import fetch_usage, render_usage
from tests.alerts.helpers import SECRET, Receiver, wait_until
from tests.support.http import Serve, assert_error, call
from tests.support.redis_servers import free_port

ADMIN = "admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
TIER = {"requests_per_minute": 10_000, "tokens_per_day": 10**9, "daily_budget_usd": 1.0,
        "max_concurrent": 100, "max_output_tokens": 16}


# Spike decisions from a subject's first request, and a request spike blocks (the defaults
# alert only, and only after 24 active hours)
DECIDE_AT_ONCE = {"action": "block", "min_history_hours": 0}


def config(hook: str, **alerts: Any) -> dict[str, Any]:
    return {"tiers": {"t": TIER, "quiet": {**TIER, "anomaly": False}},
            "pricing": {"m": {"input": 1.0, "output": 0.0}},
            "server": {"admin_tokens": [ADMIN]}, "anomaly": DECIDE_AT_ONCE,
            "alerts": {"webhooks": [hook], "webhook_secret": SECRET, "retry_max_s": 1,
                       **alerts}}


def body(user: str = "u1", tokens: int = 100, tier: str = "t") -> dict[str, Any]:
    return {"user": user, "tier": tier, "model": "m", "input_tokens": tokens,
            "max_output_tokens": 16}


async def spend(client: TestClient[Any, Any], tokens: int, charged: int | None = None,
                user: str = "u1") -> dict[str, Any]:
    """Reserve `tokens` input tokens and commit `charged` (default: the same); the commit's
    answer."""
    resp, res = await call(client, "/v1/reserve", body(user, tokens))
    assert resp.status == 200, res
    resp, done = await call(client, "/v1/commit", {
        "reservation_id": res["reservation_id"], "input_tokens": charged or tokens,
        "output_tokens": 0})
    assert resp.status == 200, done
    return dict(done)


def thresholds(alerts: list[dict[str, Any]]) -> list[float]:
    return sorted(a["threshold"] for a in alerts)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A listening webhook receiver, stopped after the test."""
    started = Receiver()
    await started.start()
    yield started
    await started.stop()


async def outbox(redis: Redis) -> list[Any]:
    entries: Any = await redis.xrange(OUTBOX_KEY)
    return [fields for _, fields in entries]


async def test_three_daemons_fire_each_threshold_once(
        serve: Serve, redis_client: Redis, receiver: Receiver) -> None:
    daemons = [await serve(config(receiver.url)) for _ in range(3)]
    # 20 calls of 5 % of the budget, reserved and committed at once on three daemons
    answers = await asyncio.gather(*(spend(daemons[i % 3], 50_000) for i in range(20)))
    fired = [a for answer in answers for a in answer["alerts"]]
    assert thresholds(fired) == [0.5, 0.8, 1.0]
    assert {a["severity"] for a in fired} == {"warning", "critical", "limit"}
    assert {a["limit"] for a in fired} == {"daily_budget_usd"}
    assert all(a["subject"] == {"scope": "user", "id": "u1"} for a in fired)
    assert all(a["budget_usd"] == 1.0 and a["spend_usd"] >= a["threshold"] for a in fired)

    await wait_until(lambda: len(receiver.accepted()) == 3, "three alerts delivered")
    await asyncio.sleep(1.5)            # long enough for a duplicate to show
    assert receiver.accepted() == Counter({a["id"]: 1 for a in fired})
    for got in receiver.received:
        assert verify_webhook_signature(SECRET, got.signature, got.body, time.time())
        assert not verify_webhook_signature("another-secret-0123", got.signature, got.body,
                                            time.time())
        assert orjson.loads(got.body) == next(a for a in fired
                                              if a["id"] == orjson.loads(got.body)["id"])
    assert sorted(f[b"id"].decode() for f in await outbox(redis_client)) == \
        sorted(a["id"] for a in fired)

    resp, usage = await call(daemons[1], "/v1/admin/usage?scope=user&id=u1", method="GET",
                             headers=AUTH)
    assert resp.status == 200, usage
    assert thresholds(usage["alerts"]) == [0.5, 0.8, 1.0]
    assert [a["threshold"] for a in usage["alerts"]] == [1.0, 0.8, 0.5]   # newest first
    budget = next(lim for lim in usage["limits"] if lim["name"] == "daily_budget_usd")
    assert (budget["used"], budget["limit"], budget["remaining"]) == (1.0, 1.0, 0.0)
    assert budget["tiers"] == ["t", "quiet"]
    assert usage["block"] is None


async def test_an_overrun_fires_every_threshold_it_jumps(
        serve: Serve, redis_client: Redis, receiver: Receiver) -> None:
    client = await serve(config(receiver.url))
    assert (await spend(client, 400_000))["alerts"] == []
    resp, res = await call(client, "/v1/reserve", body(tokens=100_000))
    assert res["warnings"] == [{"code": "budget_50", "limit": "daily_budget_usd",
                                "message": "50% of the day budget daily_budget_usd is "
                                           "spent"}]
    commit = {"reservation_id": res["reservation_id"], "input_tokens": 700_000,
              "output_tokens": 0}
    resp, done = await call(client, "/v1/commit", commit)          # 40 % -> 110 %
    assert resp.status == 200, done
    assert thresholds(done["alerts"]) == [0.5, 0.8, 1.0]
    assert done["overrun"]["cost_usd"] == 0.6
    assert max(a["spend_usd"] for a in done["alerts"]) == 1.1
    resp, again = await call(client, "/v1/commit", commit)
    assert again == {**done, "duplicate": True}
    await wait_until(lambda: len(receiver.accepted()) == 3, "three alerts delivered")
    assert len(await outbox(redis_client)) == 3       # the repeat appended nothing
    resp, denied = await call(client, "/v1/reserve", body(tokens=10))
    assert resp.status == 429 and denied["reason"] == "daily_budget_usd"


async def alert_counts(client: TestClient[Any, Any]) -> dict[tuple[str, str], float]:
    """`ratelimitd_alerts_total` of a scrape of `/metrics`, by (kind, severity)."""
    resp = await client.get("/metrics")
    assert resp.status == 200
    return {(sample.labels["kind"], sample.labels["severity"]): sample.value
            for family in text_string_to_metric_families(await resp.text())
            for sample in family.samples if sample.name == "ratelimitd_alerts_total"}


async def test_metrics_count_each_cost_alert_under_its_kind_and_severity(serve: Serve) -> None:
    client = await serve(config("http://127.0.0.1:9/unused"))
    fired = []
    for tokens in (500_000, 300_000, 200_000):       # 50 %, then 80 %, then 100 % of the budget
        fired += (await spend(client, tokens))["alerts"]
    assert [a["severity"] for a in fired] == ["warning", "critical", "limit"]
    await spend(client, 50_000, user="u2", charged=1_000_000)    # another user: all three
    counts = await alert_counts(client)
    assert {labels: n for labels, n in counts.items() if n} == {
        ("cost_threshold", "warning"): 2, ("cost_threshold", "critical"): 2,
        ("cost_threshold", "limit"): 2}
    assert set(counts) == {("cost_threshold", "warning"), ("cost_threshold", "critical"),
                           ("cost_threshold", "limit"), ("request_spike", "high"),
                           ("token_spike", "medium")}


async def test_a_request_spike_blocks_and_alerts(
        serve: Serve, redis_client: Redis, receiver: Receiver) -> None:
    client = await serve(config(receiver.url))
    for i in range(50):            # 5x the default 10 requests an hour
        resp, res = await call(client, "/v1/reserve", body())
        assert resp.status == 200, (i, res)
    resp, blocked = await call(client, "/v1/reserve", body())
    assert_error(resp, blocked, 403, "blocked", "request_spike")
    assert 899 <= int(resp.headers["Retry-After"]) <= 900
    resp, again = await call(client, "/v1/reserve", body())
    assert_error(resp, again, 403, "blocked", "request_spike")
    await wait_until(lambda: len(receiver.accepted()) == 1, "the spike delivered")
    [alert] = [orjson.loads(r.body) for r in receiver.received]
    assert (alert["kind"], alert["severity"], alert["observed"], alert["baseline"]) == \
        ("request_spike", "high", 51, 10)
    assert await redis_client.zscore(INDEX_KEY, "user:u1") is not None
    resp, usage = await call(client, "/v1/admin/usage?scope=user&id=u1&tier=t",
                             method="GET", headers=AUTH)
    assert usage["block"]["reason"] == "request_spike"
    assert [a["kind"] for a in usage["alerts"]] == ["request_spike"]
    requests = next(lim for lim in usage["limits"] if lim["name"] == "requests_per_minute")
    assert requests["used"] == 50 and requests["tiers"] == ["t"]

    # a tier with anomaly = false: as many calls, no block, no alert
    for i in range(60):
        resp, res = await call(client, "/v1/reserve", body("u9", tier="quiet"))
        assert resp.status == 200, (i, res)
    assert await redis_client.lrange("rl:{user:u9}:alerts", 0, -1) == []


async def test_a_token_spike_alerts_and_a_steady_subject_neither(
        serve: Serve, redis_client: Redis, receiver: Receiver) -> None:
    client = await serve(config(receiver.url))
    for _ in range(4):         # 2 000 tokens a request: 4x the default 500
        await spend(client, 2000, user="spiky")
    resp, res = await call(client, "/v1/reserve", body("spiky"))
    assert resp.status == 200, res              # alerted, not blocked
    for _ in range(10):
        await spend(client, 400, user="steady")
    await wait_until(lambda: len(receiver.accepted()) == 1, "the token spike delivered")
    [alert] = [orjson.loads(r.body) for r in receiver.received]
    assert (alert["kind"], alert["severity"], alert["subject"]["id"]) == \
        ("token_spike", "medium", "spiky")
    assert (alert["observed"], alert["baseline"]) == (2000, 500)
    assert await redis_client.lrange("rl:{user:steady}:alerts", 0, -1) == []
    resp, res = await call(client, "/v1/reserve", body("spiky"))
    assert resp.status == 200                   # once an hour
    await asyncio.sleep(1)
    assert len(receiver.received) == 1


class HangingReceiver:
    """Accepts webhook POSTs and answers none until released."""

    def __init__(self) -> None:
        self.port = free_port()
        self.in_flight = 0
        self.release = asyncio.Event()
        self._runner: web.AppRunner | None = None

    async def _hook(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        await self.release.wait()
        self.in_flight -= 1
        return web.Response(status=200)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()


async def test_decisions_never_wait_for_a_receiver(serve: Serve) -> None:
    hanging = HangingReceiver()
    await hanging.start()
    try:
        client = await serve(config(f"http://127.0.0.1:{hanging.port}/hook",
                                    webhook_timeout_ms=60_000))
        await spend(client, 400_000)
        assert len((await spend(client, 100_000))["alerts"]) == 1     # 50 %: one alert
        await wait_until(lambda: hanging.in_flight == 1, "the webhook POST under way")
        # while the receiver holds that POST: reserves, commits and more alerts go on
        for _ in range(5):
            assert len((await spend(client, 10_000))["alerts"]) == 0
        assert len((await spend(client, 300_000))["alerts"]) == 1     # 80 %
        assert hanging.in_flight == 1
    finally:
        await hanging.stop()


async def test_a_receiver_that_was_down_gets_every_alert_after_a_restart(
        serve: Serve, redis_client: Redis) -> None:
    receiver = Receiver()                     # not started: connections are refused
    knobs = {"webhook_timeout_ms": 200, "claim_idle_ms": 400}
    first = await serve(config(receiver.url, **knobs))
    await spend(first, 400_000)
    fired = (await spend(first, 10_000, charged=700_000))["alerts"]
    assert len(fired) == 3                        # answered at once, the receiver down
    await wait_until(lambda: _outbox_len(redis_client, 3), "the alerts in the outbox")
    await asyncio.sleep(0.5)                      # the first daemon tries, and fails
    await first.close()                           # the daemon stops (its tries pending)
    assert receiver.received == []
    await receiver.start()
    try:
        await serve(config(receiver.url, **knobs))     # the daemon again
        await wait_until(lambda: len(receiver.accepted()) == 3, "every alert delivered")
        await asyncio.sleep(1)
        assert receiver.accepted() == Counter({a["id"]: 1 for a in fired})
    finally:
        await receiver.stop()


async def _outbox_len(redis: Redis, n: int) -> bool:
    return int(await redis.xlen(OUTBOX_KEY)) == n


async def test_usage_api_auth_and_input(serve: Serve) -> None:
    client = await serve(config("http://127.0.0.1:9/hook"))
    path = "/v1/admin/usage?scope=user&id=u1"
    resp, data = await call(client, path, method="GET")
    assert_error(resp, data, 401, "missing_credentials")
    resp, data = await call(client, path, method="GET",
                            headers={"Authorization": "Bearer wrong-token-0000000"})
    assert_error(resp, data, 401, "invalid_admin_token")
    resp, data = await call(client, "/v1/admin/usage?scope=User&id=u1", method="GET",
                            headers=AUTH)
    assert_error(resp, data, 400, "invalid_request", "scope")
    resp, data = await call(client, "/v1/admin/usage?scope=user", method="GET", headers=AUTH)
    assert_error(resp, data, 400, "invalid_request", "id")
    resp, data = await call(client, path + "&tier=nope", method="GET", headers=AUTH)
    assert_error(resp, data, 400, "invalid_request", "tier")
    resp, data = await call(client, path, method="GET", headers=AUTH)
    assert resp.status == 200, data
    assert {lim["name"]: (lim["used"], lim["remaining"]) for lim in data["limits"]} == {
        "requests_per_minute": (0, 10_000), "tokens_per_day": (0, 10**9),
        "daily_budget_usd": (0, 1.0), "max_concurrent": (0, 100)}
    off = await serve({})
    resp, data = await call(off, path, method="GET", headers=AUTH)
    assert_error(resp, data, 401, "invalid_admin_token", "admin_tokens")
    # with service tokens configured too, /v1/admin/* takes the admin token, not a service one
    both = await serve({**config("http://127.0.0.1:9/hook"),
                        "server": {"admin_tokens": [ADMIN],
                                   "service_tokens": ["svc-0123456789abcdef"]}})
    resp, data = await call(both, path, method="GET", headers=AUTH)
    assert resp.status == 200, data
    resp, data = await call(both, path, method="GET",
                            headers={"Authorization": "Bearer svc-0123456789abcdef"})
    assert_error(resp, data, 403, "admin_token_required")


def _no_resets(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in lim.items() if k != "reset_ms"} for lim in data["limits"]]


async def test_usage_cli_prints_the_api_as_a_table(serve: Serve,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    client = await serve(config("http://127.0.0.1:9/hook"))
    await spend(client, 600_000)
    url = str(client.make_url("/"))
    data = await asyncio.to_thread(fetch_usage, url, ADMIN, "user", "u1", "t")
    _, api = await call(client, "/v1/admin/usage?scope=user&id=u1&tier=t", method="GET",
                        headers=AUTH)
    assert _no_resets(data) == _no_resets(api) and data["alerts"] == api["alerts"]
    table = render_usage(data)
    assert "daily_budget_usd" in table and "$0.6000" in table and "$0.4000" in table
    assert "blocked: no" in table and "recent alerts: 1" in table
    assert "daily_budget_usd at 50%: $0.6000 of $1.0000" in table

    capsys.readouterr()
    status = await asyncio.to_thread(cli_main, ["usage", "user", "u1", "--tier", "t", "--url",
                                                url, "--admin-token", ADMIN])
    out = capsys.readouterr().out
    assert status == 0 and out.splitlines()[0] == "user u1"
    assert out.splitlines()[1].split() == ["limit", "metric", "window", "used", "limit",
                                           "remaining", "reset", "tiers"]
    assert "daily_budget_usd at 50%" in out
    status = await asyncio.to_thread(cli_main, ["usage", "user", "u1", "--url", url,
                                                "--admin-token", "wrong-token-000000"])
    assert status == 1 and "401 invalid_admin_token" in capsys.readouterr().err
