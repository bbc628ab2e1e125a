"""Calendar periods (day, month, year) of the configured timezone, as the Lua needs them.

Lua has no timezone database, so each call gets the starts of the previous, current and next
two periods (by the daemon's clock) and the Lua picks the one Redis time falls in: daylight
saving is right, and a daemon clock off by up to a period still yields Redis-time answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from ratelimitd.quota.wire import CALENDAR_STARTS


@dataclass(slots=True)
class Calendar:
    """Packed period boundaries, cached while the current period lasts."""

    zone: ZoneInfo
    cache: dict[str, tuple[int, int, bytes]] = field(default_factory=dict)

    def boundaries(self, period: str, now_ms: int) -> bytes:
        hit = self.cache.get(period)
        if hit and hit[0] <= now_ms < hit[1]:
            return hit[2]
        local = datetime.fromtimestamp(now_ms / 1000, self.zone)
        start = _period_start(local, period)
        starts = [_shift(start, period, k) for k in (-1, 0, 1, 2)]
        ms = [int(s.timestamp() * 1000) for s in starts]
        packed = CALENDAR_STARTS.pack(*ms)
        self.cache[period] = (ms[1], ms[2], packed)
        return packed


def _period_start(local: datetime, period: str) -> datetime:
    day = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "year":
        return day.replace(month=1, day=1)
    return day.replace(day=1) if period == "month" else day


def _shift(start: datetime, period: str, k: int) -> datetime:
    """Start of the k-th period after `start`, at local midnight (DST-aware)."""
    if period == "year":
        naive = start.replace(tzinfo=None, year=start.year + k)
    elif period == "month":
        months = start.month - 1 + k
        naive = start.replace(tzinfo=None, year=start.year + months // 12, month=months % 12 + 1)
    else:
        naive = start.replace(tzinfo=None) + timedelta(days=k)
    return naive.replace(tzinfo=start.tzinfo)
