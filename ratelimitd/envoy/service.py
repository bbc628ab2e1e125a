"""The gRPC listener: `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit` and
`grpc.health.v1.Health`, in the serving process's event loop, on its engine.

It starts and stops with the HTTP application (`grpc_ctx`, a cleanup context after the
services), reads the services per call (a SIGHUP swaps rules and settings in place), and
stops gracefully: calls in flight finish within the HTTP shutdown's grace.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

import grpc
from aiohttp import web
from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from ratelimitd.envoy.decide import Decision, Descriptor, Status, decide
from ratelimitd.errors import ListenError, ReserveInProgress, StoreUnavailable
from ratelimitd.http.app_keys import LIVE, Live
from ratelimitd.http.edge import CLIENT_LOG
from ratelimitd.http.observe import SHADOW_REPORT, ShadowReport
from ratelimitd.ops.logs import ThrottledLog

log = logging.getLogger("ratelimitd.envoy")

SERVICE_NAME: Final = "envoy.service.ratelimit.v3.RateLimitService"
# Bounds on what one call may carry (a request is a few hundred bytes)
MAX_MESSAGE_BYTES: Final = 64 * 1024
MAX_DESCRIPTORS: Final = 64
MAX_ENTRIES: Final = 32
GRACE_S: Final = 5.0
_UNITS: Final = {"second": rls_pb2.RateLimitResponse.RateLimit.SECOND,
                 "minute": rls_pb2.RateLimitResponse.RateLimit.MINUTE,
                 "hour": rls_pb2.RateLimitResponse.RateLimit.HOUR,
                 "day": rls_pb2.RateLimitResponse.RateLimit.DAY,
                 "week": rls_pb2.RateLimitResponse.RateLimit.WEEK,
                 "month": rls_pb2.RateLimitResponse.RateLimit.MONTH,
                 "year": rls_pb2.RateLimitResponse.RateLimit.YEAR}
OK: Final = rls_pb2.RateLimitResponse.OK
OVER_LIMIT: Final = rls_pb2.RateLimitResponse.OVER_LIMIT


class RateLimitService(rls_pb2_grpc.RateLimitServiceServicer):  # type: ignore[misc]
    def __init__(self, live: Live, shadow: ShadowReport, quiet: ThrottledLog) -> None:
        self.live = live
        self.shadow = shadow
        self.quiet = quiet      # lines every call could write (Redis down): a few a window

    async def ShouldRateLimit(self, request: Any, context: Any) -> Any:
        services = self.live.services
        config = services.config
        parsed = _descriptors(request, config.envoy.request_id_key)
        if isinstance(parsed, str):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, parsed)
        assert not isinstance(parsed, str)
        descriptors, call_id = parsed
        try:
            decision = await decide(
                services.engine, config.envoy_rules, request.domain, descriptors,
                request.hits_addend or 1, config.server.shadow_mode, call_id)
        except ReserveInProgress:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "this call's first attempt is still running; retry shortly")
        except StoreUnavailable as exc:
            allow = config.redis.on_error == "allow"
            self.quiet.warning("grpc_redis_unavailable",
                               "redis unavailable, answering %s by on_error=%s: %s",
                               "OK" if allow else "OVER_LIMIT", config.redis.on_error, exc)
            return rls_pb2.RateLimitResponse(overall_code=OK if allow else OVER_LIMIT)
        for status in decision.statuses:
            if status.shadow_over and status.rule is not None:
                self.shadow.over(status.rule.path, "grpc", domain=request.domain)
        return _response(decision, config.envoy.response_headers)


def _descriptors(request: Any, id_key: str
                 ) -> tuple[list[Descriptor], tuple[str, ...] | None] | str:
    """The request's descriptors without their `id_key` entries, and the values of those
    (the call's identity; None when no descriptor carries one); or what is wrong."""
    if len(request.descriptors) > MAX_DESCRIPTORS:
        return f"descriptors: at most {MAX_DESCRIPTORS} per call"
    out = []
    call_id: list[str] = []
    for i, desc in enumerate(request.descriptors):
        if not desc.entries or len(desc.entries) > MAX_ENTRIES:
            return f"descriptors[{i}]: needs 1 to {MAX_ENTRIES} entries"
        entries = []
        for e in desc.entries:
            if id_key and e.key == id_key:
                call_id.append(e.value)
            else:
                entries.append((e.key, e.value))
        hits = desc.hits_addend.value if desc.HasField("hits_addend") else None
        override = ((desc.limit.unit, desc.limit.requests_per_unit)
                    if desc.HasField("limit") else None)
        out.append(Descriptor(tuple(entries), hits, override))
    return out, (tuple(call_id) if any(call_id) else None)


def _response(decision: Decision, headers: bool) -> Any:
    answer = rls_pb2.RateLimitResponse(overall_code=OVER_LIMIT if decision.over else OK)
    for status in decision.statuses:
        answer.statuses.append(_status(status))
    if headers:
        answer.response_headers_to_add.extend(_headers(decision.statuses))
    return answer


def _status(status: Status) -> Any:
    out = rls_pb2.RateLimitResponse.DescriptorStatus(code=OVER_LIMIT if status.over else OK)
    rule = status.rule
    if rule is None:
        return out
    if rule.limit is not None:
        out.current_limit.CopyFrom(rls_pb2.RateLimitResponse.RateLimit(
            name=rule.name, requests_per_unit=rule.requests_per_unit, unit=_UNITS[rule.unit]))
    out.limit_remaining = min(status.remaining, 2**32 - 1)
    if status.reset_ms > 0:
        out.duration_until_reset.CopyFrom(_duration(status.reset_ms))
    return out


def _duration(ms: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def _headers(statuses: Sequence[Status]) -> list[Any]:
    """RateLimit-Limit / -Remaining / -Reset of the descriptor with the least left."""
    limited = [s for s in statuses if s.rule is not None and s.rule.limit is not None]
    if not limited:
        return []
    tightest = min(limited, key=lambda s: s.remaining)
    assert tightest.rule is not None
    return [base_pb2.HeaderValue(key=k, value=v) for k, v in (
        ("RateLimit-Limit", str(tightest.rule.requests_per_unit)),
        ("RateLimit-Remaining", str(tightest.remaining)),
        ("RateLimit-Reset", str(-(-tightest.reset_ms // 1000))))]


async def grpc_ctx(app: web.Application) -> AsyncIterator[None]:
    """Serves [grpc] listen while the application runs (nothing when it names no address)."""
    config = app[LIVE].services.config
    if not config.grpc.listen:
        yield
        return
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 1),     # the workers of one daemon share the port
    ])
    service = RateLimitService(app[LIVE], app[SHADOW_REPORT], app[CLIENT_LOG])
    rls_pb2_grpc.add_RateLimitServiceServicer_to_server(service, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for address in config.grpc.listen:
        try:
            server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ListenError(f"cannot listen on {address} (grpc): {exc}") from exc
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    log.info("grpc listening on %s", ", ".join(config.grpc.listen))
    try:
        yield
    finally:
        await health.enter_graceful_shutdown()
        await server.stop(GRACE_S)
