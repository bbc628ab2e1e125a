"""Limits and tiers.

A limit is (scope, metric, window, limit, algorithm). The seed's shorthand
(`requests_per_minute`, `tokens_per_day`, `daily_budget_usd`, `max_concurrent`) expands into
limits; `max_output_tokens`, `max_prompt_chars` and `max_input_tokens` are per-call caps.
Amounts are integers: money in nano-USD.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from ratelimitd.units import format_duration, parse_duration, usd_to_nano

Metric = Literal["requests", "tokens", "input_tokens", "output_tokens", "cost_usd", "concurrent"]
Algorithm = Literal["sliding", "token_bucket", "calendar"]
# What a request spike does: alert only, or block the subject too
AnomalyAction = Literal["alert", "block"]
ANOMALY_ACTIONS: Final[tuple[AnomalyAction, ...]] = ("alert", "block")

METRICS: Final[tuple[str, ...]] = (
    "requests", "tokens", "input_tokens", "output_tokens", "cost_usd", "concurrent",
)
DEFAULT_SUB_BUCKETS: Final = 60
CALENDAR_PERIODS: Final = ("day", "month", "year")
# Scopes a request names directly; any other scope is read from the request's attributes.
BUILTIN_SCOPES: Final = ("key", "user", "org", "ip", "ip_prefix", "global")
# Order in which a reserve visits subjects: the caller's own limits deny first and cheapest.
SCOPE_ORDER: Final = {"key": 0, "user": 1, "org": 2, "ip": 4, "ip_prefix": 5, "global": 6}


@dataclass(frozen=True, slots=True)
class Limit:
    name: str
    scope: str
    metric: Metric
    limit: int                    # in the metric's unit; cost in nano-USD
    algorithm: Algorithm
    window_ms: int = 0            # sliding and token bucket
    period: str = ""              # calendar: "day" | "month"
    burst: int = 0                # token bucket capacity
    buckets: int = DEFAULT_SUB_BUCKETS
    # counted and reported like any other limit, never denies (its state is the same limit's)
    shadow: bool = False
    # Derived once: limits key caches on every request, and a dataclass hash would rebuild a
    # tuple of every field each time.
    lid: str = field(init=False, compare=False, repr=False)
    _hash: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        ident = (self.name, self.metric, self.algorithm, self.window_ms, self.period,
                 self.buckets)
        # Short id of the limit's state in Redis; changes when the state's layout would.
        lid = hashlib.blake2s("|".join(map(str, ident)).encode(), digest_size=4).hexdigest()
        object.__setattr__(self, "lid", lid)
        object.__setattr__(self, "_hash", hash((*ident, self.scope, self.limit, self.burst,
                                                self.shadow)))

    def __hash__(self) -> int:
        return self._hash

    @property
    def capacity(self) -> int:
        """The most the limit ever allows at once: a token bucket's burst, else the limit."""
        return self.burst if self.algorithm == "token_bucket" else self.limit

    @property
    def window_text(self) -> str:
        return self.period or format_duration(self.window_ms)


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    limits: tuple[Limit, ...] = ()
    max_output_tokens: int | None = None
    max_prompt_chars: int | None = None
    max_input_tokens: int | None = None
    # anomaly detection on this tier's users (lua/anomaly.lua): true (the [anomaly] action),
    # an action of its own ("alert" or "block"), or false (none)
    anomaly: bool | AnomalyAction = True
    # the limits by scope, in visiting order (see plan); derived once
    scope_groups: tuple[tuple[str, tuple[Limit, ...]], ...] = field(
        init=False, compare=False, repr=False)

    def output_cap(self, requested: int | None, default: int) -> int:
        """The output cap to reserve: the requested one within the tier's, else the tier's,
        else `default`."""
        caps = [c for c in (requested, self.max_output_tokens) if c is not None]
        return min(caps) if caps else default

    def __post_init__(self) -> None:
        scopes: dict[str, list[Limit]] = {}
        for lim in self.limits:
            scopes.setdefault(lim.scope, []).append(lim)
        order = sorted(scopes, key=lambda scope: (SCOPE_ORDER.get(scope, 3), scope))
        object.__setattr__(self, "scope_groups",
                           tuple((scope, tuple(scopes[scope])) for scope in order))


def sliding(name: str, metric: Metric, window: str, limit: int, scope: str = "user") -> Limit:
    return Limit(name, scope, metric, limit, "sliding", window_ms=parse_duration(window))


def shorthand_limits(
    requests_per_minute: int | None = None,
    tokens_per_day: int | None = None,
    daily_budget_usd: float | None = None,
    max_concurrent: int | None = None,
) -> tuple[Limit, ...]:
    """The seed's tier shorthand as limits, all scoped to the user."""
    limits: list[Limit] = []
    if requests_per_minute is not None:
        limits.append(sliding("requests_per_minute", "requests", "60s", requests_per_minute))
    if tokens_per_day is not None:
        limits.append(sliding("tokens_per_day", "tokens", "24h", tokens_per_day))
    if daily_budget_usd is not None:
        limits.append(Limit("daily_budget_usd", "user", "cost_usd", usd_to_nano(daily_budget_usd),
                            "calendar", period="day"))
    if max_concurrent is not None:
        limits.append(Limit("max_concurrent", "user", "concurrent", max_concurrent, "sliding"))
    return tuple(limits)


def default_tiers() -> dict[str, Tier]:
    """The seed's three tiers, used when a configuration names none."""
    # max_prompt_chars: room for any prompt the day's tokens could pay for (text runs about 4
    # characters a token, rarely over 10), and for a full 128k-token context on the others
    seed = {
        "free": (10, 10_000, 500, 1.0, 2, 100_000),
        "pro": (60, 100_000, 4_000, 50.0, 10, 600_000),
        "enterprise": (300, 1_000_000, 8_000, 500.0, 50, 1_000_000),
    }
    tiers = {}
    for name, (rpm, tpd, max_out, budget, concurrent, max_chars) in seed.items():
        tiers[name] = Tier(name, shorthand_limits(rpm, tpd, budget, concurrent),
                           max_output_tokens=max_out, max_prompt_chars=max_chars)
    return tiers


def check_limits(limits: Sequence[Limit]) -> None:
    """Rejects limit sets whose Redis state would collide."""
    seen: dict[tuple[str, str], str] = {}
    for lim in limits:
        key = (lim.scope, lim.lid)
        if key in seen:
            raise ValueError(f"limits {seen[key]!r} and {lim.name!r} share a name and scope")
        seen[key] = lim.name
