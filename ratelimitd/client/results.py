"""Typed answers of /v1/reserve, /v1/commit and /v1/release.

Parsing is strict about what a caller relies on (a reservation's id and granted cap) and
lenient about the rest: fields a newer daemon adds are ignored, so an old client keeps working.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ratelimitd.client.errors import RateLimited, ServerError

# Answer headers worth passing on to a gateway's own caller.
RATE_LIMIT_HEADERS: Final = ("ratelimit-policy", "ratelimit", "retry-after")
_OPENAI_PREFIX: Final = "x-ratelimit-"

Number = int | float


def rate_limit_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The IETF RateLimit-*, OpenAI x-ratelimit-* and Retry-After headers of an answer."""
    return {name: value for name, value in headers.items()
            if name.lower() in RATE_LIMIT_HEADERS or name.lower().startswith(_OPENAI_PREFIX)}


@dataclass(frozen=True, slots=True)
class LimitStatus:
    """One limit after the call: `remaining` of `limit` in its unit (USD for cost_usd)."""

    name: str
    scope: str
    metric: str
    limit: Number
    remaining: Number
    reset_ms: int
    window: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> LimitStatus:
        if not isinstance(data, dict):
            raise ServerError(f"a limit in the answer is not an object: {data!r}")
        return cls(name=str(data.get("name", "")), scope=str(data.get("scope", "")),
                   metric=str(data.get("metric", "")), limit=_number(data, "limit"),
                   remaining=_number(data, "remaining"), reset_ms=int(data.get("reset_ms") or 0),
                   window=data.get("window"))


@dataclass(frozen=True, slots=True)
class Notice:
    """A warning on a reserve (budget_80, key about to expire...) or an alert on a commit."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Reservation:
    """An admitted reserve. Pass `max_output_tokens` upstream as the call's output cap.

    reservation_id is None for a dry run, and for a degraded answer (the daemon's Redis was
    down and `[redis] on_error = "allow"` admitted the call unchecked): nothing to settle then.
    `idempotency_key` is the key the reserve was sent with (given, or generated)."""

    reservation_id: str | None
    input_tokens: int
    max_output_tokens: int
    expires_at_ms: int | None = None
    reserved_requests: int = 0
    reserved_tokens: int = 0
    reserved_cost_usd: float = 0.0
    limits: tuple[LimitStatus, ...] = ()
    warnings: tuple[Notice, ...] = ()
    duplicate: bool = False
    degraded: bool = False
    dry_run: bool = False
    idempotency_key: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, headers: Mapping[str, str],
                  idempotency_key: str | None) -> Reservation:
        if not isinstance(data, dict) or data.get("allowed") is not True:
            raise ServerError(f"not a reserve's answer: {data!r}")
        rid = data.get("reservation_id")
        if rid is not None and not isinstance(rid, str):
            raise ServerError(f"reservation_id is not a string: {rid!r}")
        reserved = data.get("reserved") or {}
        return cls(
            reservation_id=rid, input_tokens=int(_number(data, "input_tokens")),
            max_output_tokens=int(_number(data, "max_output_tokens")),
            expires_at_ms=data.get("expires_at_ms"),
            reserved_requests=int(reserved.get("requests") or 0),
            reserved_tokens=int(reserved.get("tokens") or 0),
            reserved_cost_usd=float(reserved.get("cost_usd") or 0.0),
            limits=_limits(data), warnings=_notices(data.get("warnings")),
            duplicate=bool(data.get("duplicate")), degraded=bool(data.get("degraded")),
            dry_run=bool(data.get("dry_run")), idempotency_key=idempotency_key,
            headers=rate_limit_headers(headers))


@dataclass(frozen=True, slots=True)
class CommitResult:
    """A commit's answer. duplicate: an earlier commit of this reservation (or an earlier
    attempt of this one, retried by the client) had already settled it. overrun_*: what the
    actual usage exceeded the reservation by (charged in full; the next reserve is denied)."""

    cost_usd: float
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    duplicate: bool = False
    overrun_tokens: int = 0
    overrun_cost_usd: float = 0.0
    alerts: tuple[Notice, ...] = ()

    @classmethod
    def from_json(cls, data: Any) -> CommitResult:
        if not isinstance(data, dict) or data.get("committed") is not True:
            raise ServerError(f"not a commit's answer: {data!r}")
        usage = data.get("usage") or {}
        overrun = data.get("overrun") or {}
        return cls(cost_usd=float(_number(data, "cost_usd")),
                   input_tokens=int(usage.get("input_tokens") or 0),
                   output_tokens=int(usage.get("output_tokens") or 0),
                   cached_input_tokens=int(usage.get("cached_input_tokens") or 0),
                   duplicate=bool(data.get("duplicate")),
                   overrun_tokens=int(overrun.get("tokens") or 0),
                   overrun_cost_usd=float(overrun.get("cost_usd") or 0.0),
                   alerts=_notices(data.get("alerts")))


@dataclass(frozen=True, slots=True)
class ReleaseResult:
    """A release's answer; duplicate: it had already been released."""

    duplicate: bool = False

    @classmethod
    def from_json(cls, data: Any) -> ReleaseResult:
        if not isinstance(data, dict) or data.get("released") is not True:
            raise ServerError(f"not a release's answer: {data!r}")
        return cls(duplicate=bool(data.get("duplicate")))


def denial(data: Any, headers: Mapping[str, str]) -> RateLimited:
    """A reserve's 429 as RateLimited (also a 429 from a proxy in between, with less said)."""
    body = data if isinstance(data, dict) else {}
    reason = str(body.get("reason") or "rate_limited")
    retry_ms = body.get("retry_after_ms")
    if not isinstance(retry_ms, int):
        retry_ms = _retry_after_header_ms(headers) if "reason" not in body else None
    message = str(body.get("message") or f"denied by {reason}" + (
        f"; retry in {retry_ms} ms" if retry_ms is not None else ""))
    return RateLimited(message, reason=reason, retry_after_ms=retry_ms, limits=_limits(body),
                       headers=rate_limit_headers(headers))


def _retry_after_header_ms(headers: Mapping[str, str]) -> int | None:
    value = headers.get("Retry-After", "")
    return int(value) * 1000 if value.isdigit() else None


def _number(data: Mapping[str, Any], key: str) -> Number:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ServerError(f"{key} is not a number in the answer: {value!r}")
    return value


def _limits(data: Mapping[str, Any]) -> tuple[LimitStatus, ...]:
    return tuple(LimitStatus.from_json(item) for item in data.get("limits") or ())


def _notices(items: Any) -> tuple[Notice, ...]:
    return tuple(Notice(str(i.get("code", "")), str(i.get("message", "")))
                 for i in items or () if isinstance(i, dict))
