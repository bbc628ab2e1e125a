"""A new user of the seed's tiers, over HTTP on real Redis: the default anomaly rules never stop
one that stays within its tier's limits, and the seed's blocking rules are one setting away."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from ratelimitd.alerts import OUTBOX_KEY
from tests.support.http import Serve, assert_error, call


async def reserve_and_commit(client: TestClient[Any, Any], user: str) -> tuple[int, Any]:
    """One call of an enterprise user; the reserve's status and answer."""
    resp, res = await call(client, "/v1/reserve", {
        "user": user, "tier": "enterprise", "model": "gpt-4o", "input_tokens": 10,
        "max_output_tokens": 10})
    if resp.status == 200:
        resp_commit, done = await call(client, "/v1/commit", {
            "reservation_id": res["reservation_id"], "input_tokens": 10, "output_tokens": 10})
        assert resp_commit.status == 200, done
    return resp.status, (resp, res)


async def test_a_new_enterprise_user_is_never_blocked_by_the_defaults(
        serve: Serve, redis_client: Redis) -> None:
    client = await serve({})                 # the seed's tiers, [anomaly] as it defaults
    for n in range(1, 301):                  # the tier's 300 requests a minute, at once
        status, (_, res) = await reserve_and_commit(client, "new-agent")
        assert status == 200, (n, res)
    # fewer than min_history_hours active hours: no spike decision, so no alert either
    assert await redis_client.lrange("rl:{user:new-agent}:alerts", 0, -1) == []
    assert await redis_client.xlen(OUTBOX_KEY) == 0


async def test_block_with_no_history_needed_blocks_a_new_user_at_its_51st_request(
        serve: Serve) -> None:
    client = await serve({"anomaly": {"action": "block", "min_history_hours": 0}})
    for n in range(1, 51):                   # 5x the default baseline of 10 an hour
        status, (_, res) = await reserve_and_commit(client, "new-agent")
        assert status == 200, (n, res)
    status, (resp, res) = await reserve_and_commit(client, "new-agent")
    assert_error(resp, res, 403, "blocked", "request_spike")


async def test_a_tier_may_block_while_the_others_alert(serve: Serve, redis_client: Redis) -> None:
    tier = {"requests_per_minute": 300, "max_concurrent": 50}
    client = await serve({"anomaly": {"min_history_hours": 0},
                          "tiers": {"enterprise": tier, "strict": {**tier, "anomaly": "block"}}})
    for n in range(1, 61):                   # alerted at the 51st, admitted
        status, (_, res) = await reserve_and_commit(client, "agent")
        assert status == 200, (n, res)
    [alert] = await redis_client.lrange("rl:{user:agent}:alerts", 0, -1)
    assert b"request_spike" in alert
    for n in range(1, 51):
        resp, res = await call(client, "/v1/reserve", {
            "user": "strict-agent", "tier": "strict", "model": "gpt-4o", "input_tokens": 10})
        assert resp.status == 200, (n, res)
    resp, res = await call(client, "/v1/reserve", {
        "user": "strict-agent", "tier": "strict", "model": "gpt-4o", "input_tokens": 10})
    assert_error(resp, res, 403, "blocked", "request_spike")
