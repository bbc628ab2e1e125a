"""Webhook delivery against a real Redis and real aiohttp receivers over loopback sockets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from ratelimitd.alerts import (
    OUTBOX_KEY,
    AlertService,
    Outbox,
    verify_webhook_signature,
)
from ratelimitd.config import AlertsConfig
from tests.alerts.helpers import SECRET, Receiver, alerts_config, make_alerts, wait_until
from tests.support.redis_servers import RedisServer, free_port


@pytest.fixture
async def receivers() -> AsyncIterator[Callable[[], Receiver]]:
    made: list[Receiver] = []

    def make() -> Receiver:
        made.append(Receiver())
        return made[-1]

    yield make
    for receiver in made:
        await receiver.stop()


@pytest.fixture
async def services(redis_server: RedisServer, redis_client: Redis
                   ) -> AsyncIterator[Callable[..., AlertService]]:
    """AlertServices ("daemons"), each on a Redis connection of its own, with short timings."""
    made: list[tuple[AlertService, Redis]] = []

    def make(config: AlertsConfig, **timings: Any) -> AlertService:
        client = Redis.from_url(redis_server.url)
        timings = {"claim_idle_ms": 60_000, "poll_interval_s": 0.05, "retry_base_s": 0.05,
                   **timings}
        made.append((AlertService(client, config, **timings), client))
        return made[-1][0]

    yield make
    for service, client in made:
        await service.aclose(flush_timeout_s=0.1)
        await client.aclose()


async def settled(redis: Redis, *receivers: Receiver) -> bool:
    """Every webhook group has read and acknowledged every outbox entry: nothing more will be
    sent, so counting what the receivers got is final."""
    backlog = await Outbox(redis, 1000).backlog()
    return len(backlog) == len(receivers) and all(
        pending == 0 and lag == 0 for pending, lag in backlog.values())


async def test_every_alert_reaches_every_webhook_once_signed(redis_client, receivers, services):
    hooks = [receivers(), receivers()]
    for hook in hooks:
        await hook.start()
    service = services(alerts_config(*(h.url for h in hooks)))
    await service.start()
    alerts = make_alerts(12)

    service.submit(alerts)
    service.submit(alerts[:3])  # a repeated commit answers the same alerts again

    ids = {a.id for a in alerts}
    await wait_until(lambda: all(set(h.accepted()) == ids for h in hooks), "every alert")
    await wait_until(lambda: settled(redis_client, *hooks), "the outbox acknowledged")
    by_id = {a.id: a for a in alerts}
    for hook in hooks:
        assert hook.accepted() == dict.fromkeys(ids, 1)
        assert len(hook.received) == len(alerts)
        for got in hook.received:
            assert verify_webhook_signature(SECRET, got.signature, got.body, time.time(), 300)
            body = orjson.loads(got.body)
            assert body == by_id[body["id"]].to_json()
            assert got.alert_id_header == body["id"]
    assert service.stats.delivered == 24
    assert service.stats.forwarded == 12 and service.stats.duplicates == 3


async def test_two_daemons_deliver_each_alert_once_per_webhook(redis_client, receivers,
                                                               services):
    hooks = [receivers(), receivers()]
    for hook in hooks:
        await hook.start()
    config = alerts_config(*(h.url for h in hooks))
    daemons = [services(config), services(config)]
    for daemon in daemons:
        await daemon.start()
    alerts = make_alerts(30)

    for i, alert in enumerate(alerts):
        daemons[i % 2].submit([alert])
        if i % 3 == 0:  # its commit repeated on the other daemon: the same alert again
            daemons[(i + 1) % 2].submit([alert])

    ids = {a.id for a in alerts}
    await wait_until(lambda: all(set(h.accepted()) == ids for h in hooks), "every alert")
    await wait_until(lambda: settled(redis_client, *hooks), "the outbox acknowledged")
    for hook in hooks:
        assert hook.accepted() == dict.fromkeys(ids, 1)
        assert len(hook.received) == len(alerts)
    assert sum(d.stats.delivered for d in daemons) == 60
    assert sum(d.stats.forwarded for d in daemons) == 30


async def test_a_receiver_down_then_failing_gets_every_alert_once_back(redis_client, receivers,
                                                                      services):
    hook = receivers()  # not started: connections are refused
    service = services(alerts_config(hook.url))
    await service.start()
    alerts = make_alerts(5)
    service.submit(alerts)

    await wait_until(lambda: service.stats.failed_attempts >= 3, "refused attempts")
    assert hook.received == []
    hook.fail_next = 4  # back, but answering 500 at first
    await hook.start()

    ids = {a.id for a in alerts}
    await wait_until(lambda: set(hook.accepted()) == ids, "every alert once the receiver is up")
    await wait_until(lambda: settled(redis_client, hook), "the outbox acknowledged")
    assert hook.accepted() == dict.fromkeys(ids, 1)
    assert [r.status for r in hook.received].count(500) == 4
    assert service.stats.delivered == 5


async def test_a_restarted_daemon_delivers_what_was_pending(redis_client, receivers, services):
    hook = receivers()
    hook.status = 503
    await hook.start()
    config = alerts_config(hook.url, webhook_timeout_ms=100)
    first = services(config, claim_idle_ms=300)
    await first.start()
    alerts = make_alerts(6)
    first.submit(alerts[:4])
    await wait_until(lambda: first.stats.failed_attempts >= 2, "the first daemon retrying")
    first.submit(alerts[4:])  # still queued in memory when it stops: flushed to the outbox

    await first.aclose()
    [(pending, lag)] = (await first.outbox.backlog()).values()
    assert pending >= 1 and pending + (lag or 0) == 6  # read and left unacknowledged, or unread
    hook.status = 200
    second = services(config, claim_idle_ms=300)  # the daemon again: a new consumer
    await second.start()

    ids = {a.id for a in alerts}
    await wait_until(lambda: set(hook.accepted()) == ids, "every pending alert")
    await wait_until(lambda: settled(redis_client, hook), "the outbox acknowledged")
    assert hook.accepted() == dict.fromkeys(ids, 1)
    assert first.stats.delivered == 0 and second.stats.delivered == 6


async def test_a_daemon_retrying_an_alert_keeps_it_from_the_others(redis_client, receivers,
                                                                   services):
    hook = receivers()
    hook.status = 500
    await hook.start()
    config = alerts_config(hook.url, webhook_timeout_ms=100)
    daemons = [services(config, claim_idle_ms=300), services(config, claim_idle_ms=300)]
    for daemon in daemons:
        await daemon.start()
    alerts = make_alerts(8)
    daemons[0].submit(alerts[:4])
    daemons[1].submit(alerts[4:])

    await asyncio.sleep(1.5)  # retrying for five times the claim timeout
    hook.status = 200

    ids = {a.id for a in alerts}
    await wait_until(lambda: set(hook.accepted()) == ids, "every alert")
    await wait_until(lambda: settled(redis_client, hook), "the outbox acknowledged")
    assert hook.accepted() == dict.fromkeys(ids, 1)
    assert sum(d.stats.handed_over for d in daemons) == 0


async def test_a_full_queue_is_counted_and_not_fatal(redis_client, receivers, services):
    hook = receivers()
    await hook.start()
    service = services(alerts_config(hook.url, queue_size=3))
    alerts = make_alerts(10)

    service.submit(alerts)  # not started: nothing drains the queue yet

    assert service.stats.queue_full == 7 and service.stats.submitted == 10
    await service.start()
    kept = {a.id for a in alerts[:3]}
    await wait_until(lambda: set(hook.accepted()) == kept, "the queued alerts")
    await wait_until(lambda: settled(redis_client, hook), "the outbox acknowledged")
    assert hook.accepted() == dict.fromkeys(kept, 1)
    service.submit(make_alerts(1, first=99))  # and it keeps working
    await wait_until(lambda: len(hook.accepted()) == 4, "an alert after the drops")


async def test_a_refused_alert_is_not_sent_again(redis_client, receivers, services):
    hook = receivers()
    hook.status = 422
    await hook.start()
    service = services(alerts_config(hook.url))
    await service.start()
    service.submit(make_alerts(2))

    await wait_until(lambda: settled(redis_client, hook), "the outbox acknowledged")
    assert len(hook.received) == 2
    assert service.stats.rejected == 2 and service.stats.delivered == 0


async def test_an_alert_older_than_the_delivery_age_is_dropped_and_counted(
        redis_client, receivers, services):
    hook = receivers()
    await hook.start()
    service = services(alerts_config(hook.url, delivery_max_age_s=3600))
    await service.start()
    stale = make_alerts(1, created_ms=int(time.time() * 1000) - 7_200_000)
    fresh = make_alerts(1, first=1)
    service.submit(stale + fresh)

    await wait_until(lambda: settled(redis_client, hook), "the outbox acknowledged")
    assert set(hook.accepted()) == {fresh[0].id}
    assert service.stats.expired == 1


async def test_without_webhooks_nothing_fills_the_outbox(redis_client, services):
    service = services(AlertsConfig())
    await service.start()
    service.submit(make_alerts(3))
    await service.aclose()
    assert service.stats.submitted == 3 and service.stats.forwarded == 0
    assert await redis_client.exists(OUTBOX_KEY) == 0


async def test_redis_away_is_counted_and_shutdown_still_ends(receivers):
    hook = receivers()
    await hook.start()
    nowhere = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    service = AlertService(nowhere, alerts_config(hook.url), poll_interval_s=0.05,
                           retry_base_s=0.05)
    await service.start()
    service.submit(make_alerts(2))

    await wait_until(lambda: service.stats.forward_errors >= 2, "failed appends")
    await service.aclose(flush_timeout_s=0.2)
    await nowhere.aclose()
    assert service.stats.lost_on_shutdown == 2 and service.stats.forwarded == 0
    assert service.stats.redis_errors >= 1 and hook.received == []
