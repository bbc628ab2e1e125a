"""Alerts: Redis time per alert, webhook delivery throughput, Redis memory per alert.

Starts its own redis-server (loopback, free port) and an aiohttp webhook receiver, then:
  * Redis server time (INFO commandstats) of appending an alert to its subject's stream with
    the quota scripts' helper (lua/alerts.lua: emit_alert), of forwarding it to the outbox,
    and of the stream commands delivery runs per alert;
  * how fast a backlog of alerts reaches one webhook, from one and from two daemons (both in
    this one process, beside the receiver: the second shows that none is sent twice, not speed);
  * Redis memory per alert: outbox entry, forwarded-marker key, subject stream entry.
Usage: python bench/alerts_bench.py [--alerts N]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import redis
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ratelimitd.alerts import Alert, AlertService, Outbox, subject_alerts_key
from ratelimitd.alerts.streams import OUTBOX_KEY
from ratelimitd.config import AlertsConfig
from ratelimitd.policy import Subject
from ratelimitd.quota.library import shared_script
from tests.alerts.helpers import Receiver, wait_until
from tests.support.redis_servers import RedisServer

SECRET = "bench-secret-0123456789"


def alerts(count: int, start: int) -> list[Alert]:
    now = int(time.time() * 1000)
    return [Alert.cost_threshold(Subject("user", f"u{i}"), "daily_budget_usd", 0.8,
                                 800_000_000, 1_000_000_000, now - now % 86_400_000, now)
            for i in range(start, start + count)]


def usec_per_call(client: redis.Redis, command: str) -> float:
    stats = client.info("commandstats").get(f"cmdstat_{command}")
    return float(stats["usec_per_call"]) if stats else 0.0


async def redis_time(url: str, sync: redis.Redis, count: int) -> None:
    client = Redis.from_url(url)
    emit = client.register_script(shared_script("""
        return emit_alert(KEYS[2], KEYS[1], tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[7],
                          800000, 800000000, 1000000000, 0, 0, tonumber(ARGV[8]))"""))
    outbox = Outbox(client, 100_000)
    batch = alerts(count, 0)
    sync.config_resetstat()
    for a in batch:
        await emit(keys=[subject_alerts_key(a.subject), f"rl:{{{a.subject.tag}}}"],
                   args=[a.created_ms, a.kind, a.severity, a.scope, a.subject_id,
                         a.subject.tag, a.limit, a.period_start_ms])
    helper = usec_per_call(sync, "evalsha")
    empty = client.register_script(shared_script("return 1"))  # the script's own overhead
    sync.config_resetstat()
    for a in batch:
        await empty(keys=[subject_alerts_key(a.subject), f"rl:{{{a.subject.tag}}}"],
                    args=[a.created_ms, a.kind, a.severity, a.scope, a.subject_id,
                          a.subject.tag, a.limit, a.period_start_ms])
    overhead = usec_per_call(sync, "evalsha")
    print(f"push to the subject's list (settle helper):     {helper - overhead:.2f} us per "
          f"alert (a script of the helper alone: {helper:.2f} us, an empty one {overhead:.2f})")
    sync.config_resetstat()
    for a in batch:
        await outbox.forward(a)
    print(f"forward to the outbox (marker + XADD):          "
          f"{usec_per_call(sync, 'evalsha'):.2f} us per alert")
    memory(sync, count)
    await client.aclose()


def memory(sync: redis.Redis, count: int) -> None:
    outbox = sync.memory_usage(OUTBOX_KEY, samples=0) or 0
    marker = sync.memory_usage(next(sync.scan_iter("rl:{alerts}:seen:*", count=1000)))
    stream = sync.memory_usage(subject_alerts_key(Subject("user", "u0")), samples=0) or 0
    print(f"memory: outbox {outbox / count:.0f} B per alert, forwarded marker {marker} B "
          f"per alert (for a day), a subject's list with one alert {stream} B")


async def throughput(url: str, sync: redis.Redis, count: int, daemons: int) -> None:
    sync.flushall()
    hook = Receiver()
    await hook.start()
    config = AlertsConfig(webhooks=(hook.url,), webhook_secret=SECRET)
    clients = [Redis.from_url(url) for _ in range(daemons)]
    services = [AlertService(c, config, poll_interval_s=0.05) for c in clients]
    batch = alerts(count, 0)
    for i, service in enumerate(services):  # the backlog waits in the outbox, as after an outage
        service.submit(batch[i::daemons])
        await service.aclose()
    services = [AlertService(c, config, poll_interval_s=0.05) for c in clients]
    sync.config_resetstat()
    started = time.perf_counter()
    for service in services:
        await service.start()
    await wait_until(lambda: len(hook.accepted()) == count, "every alert", timeout_s=300)
    elapsed = time.perf_counter() - started
    per_alert = sum(usec_per_call(sync, c) * int(sync.info("commandstats")
                                                 .get(f"cmdstat_{c}", {}).get("calls", 0))
                    for c in ("xreadgroup", "xack", "xautoclaim", "xpending", "xclaim"))
    print(f"delivery, {daemons} daemon(s): {count} alerts in {elapsed:.2f} s = "
          f"{count / elapsed:.0f} alerts/s; stream commands {per_alert / count:.2f} us of "
          f"Redis time per alert; duplicates {sum(hook.accepted().values()) - count}")
    for service in services:
        await service.aclose()
    for client in clients:
        await client.aclose()
    await hook.stop()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--alerts", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp))
        sync = redis.Redis(port=server.port)
        try:
            await redis_time(server.url, sync, args.alerts)
            for daemons in (1, 2):
                await throughput(server.url, sync, args.alerts, daemons)
        finally:
            sync.close()
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
