"""The aiohttp application: its services (built in cleanup_ctx), its routes, its probes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

from aiohttp import web

from ratelimitd.auth import open_access
from ratelimitd.config import Config, resolve_tokens
from ratelimitd.errors import StoreUnavailable
from ratelimitd.http import admin, decisions, observe, usage
from ratelimitd.http.alerting import alerting_ctx
from ratelimitd.http.app_keys import CONFIG, LIVE, REDIS_URL, Live, Services
from ratelimitd.http.edge import (
    BODY_TIMEOUT_S,
    CLIENT_LOG,
    MAX_BODY_BYTES,
    DecisionHandler,
    Handler,
    api_handler,
    client_log,
    client_log_ctx,
    json_response,
    method_not_allowed,
    not_found,
    served_by_aiohttp,
)
from ratelimitd.http.lane import LANE_ROUTES
from ratelimitd.http.openapi import openapi_spec
from ratelimitd.quota.engine import Engine
from ratelimitd.quota.model import AnomalySettings, EngineSettings
from ratelimitd.store.connect import open_store
from ratelimitd.store.supervisor import StoreHealth
from ratelimitd.tokenize import TokenCounter

log = logging.getLogger("ratelimitd.http")

# Threads that encode long prompts off the event loop (tiktoken releases the GIL): as many
# as the machines this runs on have cores to spare beside the loop.
TOKENIZER_THREADS: Final = 2


async def healthz(request: web.Request) -> web.Response:
    """The process is up; with an embedded Redis, also that its redis-server runs (a daemon
    whose redis-server died answers 503 until its supervisor has restarted it)."""
    health = request.app.get(STORE_HEALTH)
    problem = health.problem() if health is not None else None
    if problem is not None:
        return json_response({"status": "embedded_redis_down", "redis": problem}, 503)
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    services = request.app[LIVE].services
    try:
        await services.engine.ready()
    except StoreUnavailable as exc:
        return json_response({"ready": False, "redis": f"unavailable ({exc})"}, 503)
    return json_response({"ready": True, "redis": "ok", "scripts": "loaded",
                          "config": services.config.source})


async def openapi(request: web.Request) -> web.Response:
    return json_response(request.app[OPENAPI])


# POST only; served by the lane too (lane.py)
DECISIONS: Final[tuple[tuple[str, DecisionHandler], ...]] = (
    ("/v1/reserve", decisions.reserve),
    ("/v1/commit", decisions.commit),
    ("/v1/release", decisions.release),
)
ROUTES: Final[tuple[tuple[str, str, Handler], ...]] = (
    ("GET", "/healthz", healthz),
    ("GET", "/readyz", readyz),
    ("GET", "/openapi.json", openapi),
    ("GET", "/metrics", observe.metrics_handler),
    *admin.ROUTES,
    ("GET", "/v1/admin/usage", usage.usage),
)


async def _services_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    store = open_store(config.redis, app[REDIS_URL])
    engine = Engine(store.transport,
                    EngineSettings(reservation_ttl_ms=config.reservations.ttl_s * 1000,
                                   commit_grace_ms=config.reservations.commit_grace_s * 1000,
                                   timezone=config.calendar.timezone,
                                   alert_thresholds=config.alerts.thresholds,
                                   anomaly=AnomalySettings(
                                       # the loader admits only these two
                                       "block" if config.anomaly.action == "block"
                                       else "alert",
                                       config.anomaly.min_history_hours,
                                       config.anomaly.request_spike_factor,
                                       config.anomaly.token_spike_factor,
                                       config.anomaly.block_s * 1000,
                                       config.anomaly.default_requests_per_hour,
                                       config.anomaly.default_tokens_per_request)))
    try:
        access = await open_access(config, store.client)
    except BaseException:
        await store.aclose()
        raise
    service_tokens, admin_tokens = resolved_tokens(config)
    executor = ThreadPoolExecutor(max_workers=TOKENIZER_THREADS,
                                  thread_name_prefix="ratelimitd-tokens")
    app[LIVE].services = Services(
        config=config, store=store, engine=engine,
        counter=TokenCounter(config.tokens.default_encoding, config.tokens.models,
                             config.tokens.image_tokens),
        prices=config.pricing.table(), executor=executor, access=access,
        service_tokens=service_tokens, admin_tokens=admin_tokens)
    try:
        await engine.load_library()
    except StoreUnavailable as exc:  # /readyz says so; the library loads on first use
        log.warning("could not load the function library at startup: %s", exc)
    yield
    executor.shutdown(wait=False, cancel_futures=True)
    await access.aclose()
    await engine.aclose()
    await store.aclose()


def resolved_tokens(config: Config) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """The service and admin tokens of a configuration, as the edge compares them."""
    return (resolve_tokens(config.server.service_tokens),
            resolve_tokens(config.server.admin_tokens))


STORE_HEALTH: Final = web.AppKey("store_health", StoreHealth)
OPENAPI: Final = web.AppKey("openapi", dict)


def create_app(config: Config, redis_url: str, health: StoreHealth | None = None,
               metrics_dir: Path | None = None) -> web.Application:
    """The application; `health`: the embedded Redis's supervisor state, for /healthz;
    `metrics_dir`: the directory the workers of one daemon share their metrics in."""
    app = web.Application(client_max_size=config.server.max_body_bytes)
    metrics = app[observe.METRICS] = observe.build_metrics(config, metrics_dir)
    app[observe.REDIS_CALLS] = observe.RedisCalls.of(metrics)
    app[CONFIG] = config
    app[REDIS_URL] = redis_url
    if health is not None:
        app[STORE_HEALTH] = health
    app[MAX_BODY_BYTES] = config.server.max_body_bytes
    app[BODY_TIMEOUT_S] = config.server.body_timeout_s
    app[CLIENT_LOG] = client_log(log)
    app[observe.SHADOW_REPORT] = observe.ShadowReport(metrics, logging.getLogger(
        "ratelimitd.shadow"))
    app[OPENAPI] = openapi_spec(config)
    app[LIVE] = Live()  # its services are made at startup (_services_ctx)
    app.cleanup_ctx.append(client_log_ctx)
    app.cleanup_ctx.append(_services_ctx)
    app.cleanup_ctx.append(alerting_ctx)
    app.cleanup_ctx.append(observe.metrics_ctx)
    app.cleanup_ctx.append(observe.shadow_report_ctx)
    lane_routes = app[LANE_ROUTES] = {}
    by_path: dict[str, list[tuple[str, Handler]]] = {}
    for path, decision in DECISIONS:
        lane_routes[path] = api_handler(decision, metrics.route(path))
        by_path[path] = [("POST", served_by_aiohttp(lane_routes[path]))]
    for method, path, handler in ROUTES:     # one resource per path, whatever its methods
        by_path.setdefault(path, []).append((method, handler))
    for path, handlers in by_path.items():
        resource = app.router.add_resource(path)
        allowed = []
        route = metrics.route(path)
        for method, handler in handlers:
            wrapped = handler if path in lane_routes else api_handler(handler, route)
            resource.add_route(method, wrapped)
            allowed.append(method)
            if method == "GET" and not path.startswith("/v1/"):
                # RFC 9110 9.3.2: a GET resource answers HEAD alike, bodiless (the probes)
                resource.add_route("HEAD", wrapped)
                allowed.append("HEAD")
        resource.add_route("*", api_handler(method_not_allowed(", ".join(allowed)), route))
    app.router.add_route("*", "/{tail:.*}", api_handler(not_found, metrics.route("other")))
    return app
