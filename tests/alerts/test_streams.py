"""The subject streams and the outbox, in a real Redis."""

from __future__ import annotations

from redis.crc import key_slot

from ratelimitd.alerts import (
    Alert,
    Outbox,
    append_alert,
    decode_alert_json,
    recent_alerts,
    subject_alerts_key,
)
from ratelimitd.alerts.streams import OUTBOX_KEY, SEEN_PREFIX, SUBJECT_MAX_LEN
from ratelimitd.policy import Subject
from ratelimitd.quota.library import shared_script

U1 = Subject("user", "u1")


def alert(subject: Subject, threshold: float, created_ms: int) -> Alert:
    return Alert.cost_threshold(subject, "daily_budget_usd", threshold, 5, 10,
                                created_ms - created_ms % 86_400_000, created_ms)


def test_a_subjects_alerts_are_in_its_slot_and_the_outbox_in_one_of_its_own():
    odd = Subject("user", "a{b}c")
    for subject in (U1, odd):
        assert key_slot(subject_alerts_key(subject).encode()) == key_slot(
            f"rl:{{{subject.tag}}}:limits".encode())
    assert key_slot(OUTBOX_KEY.encode()) == key_slot(f"{SEEN_PREFIX}alt_123".encode())


async def test_recent_alerts_are_the_subjects_own_newest_first(redis_client):
    for i, threshold in enumerate((0.5, 0.8, 1.0)):
        await append_alert(redis_client, alert(U1, threshold, 1_764_000_000_000 + i))
    await append_alert(redis_client, alert(Subject("user", "u2"), 0.5, 1_764_000_000_009))

    recent = await recent_alerts(redis_client, U1)
    assert [a.threshold for a in recent] == [1.0, 0.8, 0.5]
    assert [a.threshold for a in await recent_alerts(redis_client, U1, count=2)] == [1.0, 0.8]
    assert await recent_alerts(redis_client, Subject("org", "u1")) == []


async def test_a_subjects_alerts_are_capped_and_expire(redis_client):
    for i in range(3 * SUBJECT_MAX_LEN):
        await append_alert(redis_client, alert(U1, 0.5, 1_764_000_000_000 + i * 86_400_000))
    key = subject_alerts_key(U1)
    assert await redis_client.llen(key) == SUBJECT_MAX_LEN
    assert await redis_client.pttl(key) > 30 * 86_400_000
    newest = await recent_alerts(redis_client, U1, count=1000)
    assert len(newest) == SUBJECT_MAX_LEN
    assert newest[0].created_ms == 1_764_000_000_000 + (3 * SUBJECT_MAX_LEN - 1) * 86_400_000


async def test_a_subjects_few_alerts_take_little_memory(redis_client):
    for threshold in (0.5, 0.8, 1.0):
        await append_alert(redis_client, alert(U1, threshold, 1_764_000_000_000))
    assert await redis_client.memory_usage(subject_alerts_key(U1), samples=0) < 1500


async def test_an_entry_that_is_not_an_alert_is_left_out(redis_client):
    await append_alert(redis_client, alert(U1, 0.5, 1_764_000_000_000))
    await redis_client.lpush(subject_alerts_key(U1), b'{"v": "2"}', b"not json", b'["v", "9"]')
    assert [a.threshold for a in await recent_alerts(redis_client, U1)] == [0.5]


async def test_forwarding_the_same_alert_twice_appends_it_once(redis_client):
    outbox = Outbox(redis_client, 1000)
    first, second = alert(U1, 0.5, 1_764_000_000_000), alert(U1, 0.8, 1_764_000_000_001)

    assert await outbox.forward(first) is True
    assert await outbox.forward(first) is False
    assert await outbox.forward(second) is True

    entries = await redis_client.xrange(OUTBOX_KEY)
    assert [f[b"id"].decode() for _, f in entries] == [first.id, second.id]
    assert await outbox.backlog() == {}


async def test_the_outbox_is_capped(redis_client):
    outbox = Outbox(redis_client, 100)
    for i in range(500):
        await outbox.forward(alert(Subject("user", f"u{i}"), 0.5, 1_764_000_000_000))
    assert 100 <= await redis_client.xlen(OUTBOX_KEY) <= 201


async def test_the_lua_helper_for_the_settle_script_appends_what_python_decodes(redis_client):
    """lua/alerts.lua's emit_alert as the quota scripts use it, with a budget of 17 digits and
    a subject id the hash tag escapes."""
    subject = Subject("user", "big{spender}")
    expected = Alert.cost_threshold(subject, "monthly_budget", 0.8, 8_000_000_000_000_001,
                                    10_000_000_000_000_000, 1_764_547_200_000, 1_764_550_000_123)
    call = shared_script("""
        local n = {}
        for i = 1, #ARGV do n[i] = tonumber(ARGV[i]) or ARGV[i] end
        return emit_alert(KEYS[1], KEYS[2], n[1], ARGV[2], ARGV[3], ARGV[4], n[5], n[6], n[7],
                          n[8], n[9], n[10])""")
    keys = (f"rl:{{{subject.tag}}}", subject_alerts_key(subject))
    reply = await redis_client.eval(
        call, 2, *keys, expected.created_ms, "cost_threshold", "critical", "monthly_budget",
        800_000, expected.spend_nano, expected.budget_nano, 0, 0, expected.period_start_ms)

    assert decode_alert_json(reply) == expected
    assert await recent_alerts(redis_client, subject) == [expected]
    for _ in range(SUBJECT_MAX_LEN):  # the helper keeps as many as append_alert
        await redis_client.eval(call, 2, *keys, expected.created_ms, "cost_threshold",
                                "critical", "monthly_budget", 800_000, 1, 1, 0, 0, 0)
    assert await redis_client.llen(subject_alerts_key(subject)) == SUBJECT_MAX_LEN
