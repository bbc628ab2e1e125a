"""Every metric the daemon exports, and the fixed lists that bound their labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ratelimitd.quota.alert_record import SEVERITIES

OTHER: Final = "other"

# The routes the daemon serves; any other path (404s, scans) is counted as "other".
ROUTES: Final = frozenset({
    "/v1/reserve", "/v1/commit", "/v1/release", "/healthz", "/readyz", "/metrics",
    "/openapi.json", "/v1/admin/keys", "/v1/admin/keys/{key_id}",
    "/v1/admin/keys/{key_id}/rotate", "/v1/admin/keys/{key_id}/revoke", "/v1/admin/usage",
    "/v1/admin/blocks"})
STATUS_CODES: Final = ("200", "201", "400", "401", "403", "404", "405", "409", "413", "422",
                       "429", "500", "503")
DECISION_RESULTS: Final = frozenset({"allowed", "denied", "invalid", "unauthenticated",
                                     "blocked", "error", "degraded"})
REDIS_CALLS: Final = frozenset({"reserve", "commit", "release", "resize", "load", "ready",
                                "admin"})
REDIS_ERRORS: Final = ("TimeoutError", "ConnectionError", "ResponseError", "BusyLoadingError",
                       "ReadOnlyError", "AuthenticationError")
# (kind, severity) of every alert there is: a cost threshold's severity names which one
ALERT_LABELS: Final = frozenset((kind, severity) for kind, severities in SEVERITIES.items()
                                for severity in severities)
BLOCK_CAUSES: Final = frozenset({"auth_failures", "anomaly", "admin"})
BLOCK_SCOPES: Final = frozenset({"key", "user", "org", "ip", "ip_prefix", "global"})

# Seconds. The daemon answers in about a millisecond; Redis calls in tens to hundreds of µs.
HTTP_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                       2.5)
REDIS_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                        0.25)
NANO_PER_USD: Final = 1_000_000_000


def bounded(value: str | None, allowed: frozenset[str]) -> str:
    return value if value is not None and value in allowed else OTHER


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    help: str
    kind: str  # counter | histogram
    labelnames: tuple[str, ...]
    buckets: tuple[float, ...] = ()

    @property
    def width(self) -> int:
        """Floats per child: a counter's value; a histogram's buckets, +Inf, and sum."""
        return len(self.buckets) + 2 if self.kind == "histogram" else 1


FAMILIES: Final = {f.name: f for f in (
    Family("ratelimitd_decisions", "Reserve decisions by result, reason (the denying limit's "
            "name, an error code, or none) and tier", "counter", ("result", "reason", "tier")),
    Family("ratelimitd_http_request_duration_seconds", "Time to answer, per route",
            "histogram", ("route",), HTTP_BUCKETS),
    Family("ratelimitd_http_responses", "Answers per route and status code", "counter",
            ("route", "code")),
    Family("ratelimitd_redis_call_duration_seconds", "Time of one Redis call, per kind",
            "histogram", ("call",), REDIS_BUCKETS),
    Family("ratelimitd_redis_errors", "Failed Redis calls by kind and error", "counter",
            ("call", "error")),
    Family("ratelimitd_reservations", "Reservations committed, released, or found expired by "
            "a commit or release", "counter", ("event",)),
    Family("ratelimitd_tokens", "Tokens reserved (input + granted output) and committed "
            "(actual usage)", "counter", ("stage", "tier", "model")),
    Family("ratelimitd_cost_usd", "USD reserved and committed", "counter",
            ("stage", "tier", "model")),
    Family("ratelimitd_overruns", "Commits whose actual usage exceeded the reservation",
            "counter", ("tier", "model")),
    Family("ratelimitd_overrun_tokens", "Tokens used beyond the reservation", "counter",
            ("tier", "model")),
    Family("ratelimitd_alerts", "Alerts raised, by kind and severity", "counter",
            ("kind", "severity")),
    Family("ratelimitd_blocks", "Blocks placed, by scope and cause", "counter",
            ("scope", "cause")),
    Family("ratelimitd_shadow_over", "Decisions a shadow limit would have denied (it never "
            "denies), per limit: a tier limit's name or an Envoy rule's path", "counter",
            ("limit",)),
    Family("ratelimitd_unreplicated_settles", "Commits and releases applied but not "
            "acknowledged by [redis] replicas_ack replicas in time", "counter", ("call",)),
)}
SETTLE_CALLS: Final = ("commit", "release")
