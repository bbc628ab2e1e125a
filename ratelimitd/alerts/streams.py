"""Alerts in Redis: each subject's recent alerts, and the outbox stream webhooks read.

Two keys, because a quota script may only touch keys of its subject's hash slot:

- `rl:{<tag>}:alerts`, one per subject, in the subject's slot: a list, newest first, of its last
  SUBJECT_MAX_LEN alerts, each the flat field/value pairs of quota/alert_record.py as a JSON
  array of strings. The settle (and reserve) Lua pushes each alert it decides here, atomically
  with the spend that crossed the threshold: the record that makes an alert fire exactly once,
  and what the usage API reads (`recent_alerts`). It expires SUBJECT_TTL_MS after its newest
  alert, so an idle subject leaves nothing behind. A list and not a stream: measured on Redis
  7.0, a stream holding one alert takes 4 728 bytes (streams preallocate a 4 KB node), a list
  512, and three alerts 1 152; most subjects that alert at all have a few.

- `rl:{alerts}:outbox`, one stream for the whole deployment, in a slot of its own. The daemon
  that got the alerts in a script's reply appends them here (`Outbox.forward`), at least once,
  and each webhook's consumer group reads it (delivery.py). The append is idempotent: a marker
  key `rl:{alerts}:seen:<alert id>` (same slot) is set with the entry, so the same alert
  forwarded again (a repeated commit answers the same alerts) is not appended twice.

`append_alert` does what the Lua does, as a script of its own: for tests, and for producers
that are not quota scripts. The quota scripts push with lua/alerts.lua's `emit_alert`.
"""

from __future__ import annotations

from typing import Any, Final

from ratelimitd.errors import StoreReplyError
from ratelimitd.policy import Subject
from ratelimitd.quota import wire
from ratelimitd.quota.alert_record import Alert, AlertDecodeError, decode_alert_json
from ratelimitd.quota.scripts import script_source
from ratelimitd.store.connect import RedisClient
from ratelimitd.store.failures import DRIVER_FAILURES, store_error

OUTBOX_KEY: Final = "rl:{alerts}:outbox"
SEEN_PREFIX: Final = "rl:{alerts}:seen:"
# a subject's alerts kept (and the most a reader gets), and how long after its newest: the
# quota Lua's values (wire.py)
SUBJECT_MAX_LEN: Final = wire.ALERT_LIST_MAX_LEN
SUBJECT_TTL_MS: Final = wire.ALERT_LIST_TTL_MS
# How long a forwarded alert's marker lives: longer than a settled reservation answers repeats
# (2 x [reservations] ttl_s), so a repeated commit never appends it again. ~100 bytes each.
SEEN_TTL_MS: Final = 86_400_000

def subject_alerts_key(subject: Subject) -> str:
    return f"rl:{{{subject.tag}}}:alerts"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def append_alert(redis: RedisClient, alert: Alert, max_len: int = SUBJECT_MAX_LEN,
                       ttl_ms: int = SUBJECT_TTL_MS) -> None:
    """Pushes `alert` to its subject's recent alerts, keeping the last `max_len`. It decides
    nothing: exactly once is the caller's business (the quota script's)."""
    script = redis.register_script(script_source("alert_append"))
    await script(keys=[subject_alerts_key(alert.subject)],
                 args=[max_len, ttl_ms, *alert.fields()])


async def recent_alerts(redis: RedisClient, subject: Subject,
                        count: int = SUBJECT_MAX_LEN) -> list[Alert]:
    """The subject's latest alerts, newest first, at most `count` (1 to SUBJECT_MAX_LEN). An
    entry that does not decode (written by a newer version) is left out."""
    count = max(1, min(count, SUBJECT_MAX_LEN))
    alerts = []
    for raw in await redis.lrange(subject_alerts_key(subject), 0, count - 1):
        try:
            alerts.append(decode_alert_json(raw))
        except AlertDecodeError:
            continue
    return alerts


class Outbox:
    """The deployment-wide outbox stream, capped at `max_len` entries (MAXLEN ~)."""

    def __init__(self, redis: RedisClient, max_len: int, seen_ttl_ms: int = SEEN_TTL_MS) -> None:
        self.redis = redis
        self.key = OUTBOX_KEY
        self.max_len = max_len
        self._seen_ttl_ms = seen_ttl_ms
        self._script = redis.register_script(script_source("alert_forward"))

    async def forward(self, alert: Alert) -> bool:
        """Appends `alert` unless it was forwarded before: True when appended."""
        entry = await self._script(keys=[self.key, SEEN_PREFIX + alert.id],
                                   args=[self._seen_ttl_ms, self.max_len, *alert.fields()])
        return entry is not None

    async def backlog(self) -> dict[str, tuple[int, int | None]]:
        """Per consumer group (one per webhook): entries read but not acknowledged, and
        entries not read yet (None when Redis cannot tell, after a trim)."""
        try:
            groups = await self.redis.xinfo_groups(self.key)
        except DRIVER_FAILURES as exc:
            failure = store_error(exc)
            if isinstance(failure, StoreReplyError) and "no such key" in str(failure).lower():
                return {}  # no stream yet: nothing is waiting
            raise
        return {_text(g["name"]): (int(g["pending"]), None if g.get("lag") is None
                                   else int(g["lag"])) for g in groups}
