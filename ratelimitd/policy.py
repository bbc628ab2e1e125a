"""Policy model: tiers made of limits, and which subject each limit counts against.

A limit is (scope, metric, window, limit, algorithm). The seed's shorthand
(`requests_per_minute`, `tokens_per_day`, `daily_budget_usd`, `max_concurrent`) expands into
limits; `max_output_tokens`, `max_prompt_chars` and `max_input_tokens` are per-call caps.
Amounts are integers: money in nano-USD.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

Metric = Literal["requests", "tokens", "input_tokens", "output_tokens", "cost_usd", "concurrent"]
Algorithm = Literal["sliding", "token_bucket", "calendar"]

METRICS: Final[tuple[str, ...]] = (
    "requests", "tokens", "input_tokens", "output_tokens", "cost_usd", "concurrent",
)
NANO_PER_USD: Final = 1_000_000_000
DEFAULT_SUB_BUCKETS: Final = 60
CALENDAR_PERIODS: Final = ("day", "month")
# Scopes a request names directly; any other scope is read from the request's attributes.
BUILTIN_SCOPES: Final = ("key", "user", "org", "ip", "ip_prefix", "global")
# Order in which a reserve visits subjects: the caller's own limits deny first and cheapest.
_SCOPE_ORDER: Final = {"key": 0, "user": 1, "org": 2, "ip": 4, "ip_prefix": 5, "global": 6}


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
        object.__setattr__(self, "_hash", hash((*ident, self.scope, self.limit, self.burst)))

    def __hash__(self) -> int:
        return self._hash

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
        order = sorted(scopes, key=lambda scope: (_SCOPE_ORDER.get(scope, 3), scope))
        object.__setattr__(self, "scope_groups",
                           tuple((scope, tuple(scopes[scope])) for scope in order))


@dataclass(frozen=True, slots=True)
class Subject:
    """Who a limit counts against, e.g. Subject("user", "u1"). Its tag is its hash slot."""

    scope: str
    id: str

    @property
    def tag(self) -> str:
        # '{' and '}' would end the Redis Cluster hash tag early; '%' escapes them.
        safe = self.id.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
        return f"{self.scope}:{safe}"


@dataclass(frozen=True, slots=True)
class Identity:
    """What a reserve knows about its caller."""

    user: str
    tier: str
    org: str | None = None
    key_id: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)


def parse_duration(text: str) -> int:
    """'90s', '15m', '1h', '24h', '7d' -> milliseconds."""
    units = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
    for suffix in ("ms", "s", "m", "h", "d"):
        number = text[: -len(suffix)]
        if text.endswith(suffix) and number.isdigit() and int(number) > 0:
            return int(number) * units[suffix]
    raise ValueError(f"bad duration {text!r}: use a whole number with ms, s, m, h or d")


def format_duration(ms: int) -> str:
    """60000 -> '60s', 3600000 -> '1h', 86400000 -> '24h', as windows are usually written."""
    if ms % 3_600_000 == 0:
        return f"{ms // 3_600_000}h"
    if ms % 60_000 == 0 and ms > 60_000:
        return f"{ms // 60_000}m"
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    return f"{ms}ms"


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


def usd_to_nano(usd: float) -> int:
    return round(usd * NANO_PER_USD)


def default_tiers() -> dict[str, Tier]:
    """The seed's three tiers, used when a configuration names none."""
    seed = {
        "free": (10, 10_000, 500, 1.0, 2),
        "pro": (60, 100_000, 4_000, 50.0, 10),
        "enterprise": (300, 1_000_000, 8_000, 500.0, 50),
    }
    tiers = {}
    for name, (rpm, tpd, max_out, budget, concurrent) in seed.items():
        tiers[name] = Tier(name, shorthand_limits(rpm, tpd, budget, concurrent),
                           max_output_tokens=max_out)
    return tiers


def subject_id(scope: str, who: Identity) -> str | None:
    """The id a limit of this scope counts against, or None when the request does not say."""
    if scope == "user":
        return who.user
    if scope == "org":
        return who.org
    if scope == "key":
        return who.key_id
    if scope == "global":
        return "*"
    if scope == "ip_prefix":
        ip = who.attributes.get("ip")
        return ip_prefix(ip) if ip else None
    return who.attributes.get(scope)


def ip_prefix(ip: str) -> str:
    """The network an address belongs to for per-network limits: /24 for IPv4, /64 for IPv6."""
    address = ipaddress.ip_address(ip)
    bits = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{bits}", strict=False))


def plan(tier: Tier, who: Identity) -> list[tuple[Subject, Sequence[Limit]]]:
    """Groups the tier's limits by the subject they count against, in visiting order.

    The caller's user always comes first, even without limits of its own: its slot holds the
    reservation record that commit and release find. A limit whose scope the request does not
    name (no org, no ip attribute…) does not apply.
    """
    subjects: list[tuple[Subject, Sequence[Limit]]] = [(Subject("user", who.user), ())]
    for scope, limits in tier.scope_groups:
        sid = subject_id(scope, who)
        if sid is None:
            continue
        if scope == "user":
            subjects[0] = (subjects[0][0], limits)
        else:
            subjects.append((Subject(scope, sid), limits))
    return subjects


def check_limits(limits: Sequence[Limit]) -> None:
    """Rejects limit sets whose Redis state would collide."""
    seen: dict[tuple[str, str], str] = {}
    for lim in limits:
        key = (lim.scope, lim.lid)
        if key in seen:
            raise ValueError(f"limits {seen[key]!r} and {lim.name!r} share a name and scope")
        seen[key] = lim.name
