"""The aiohttp application: its services (built in cleanup_ctx), its routes, its probes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Final

from aiohttp import web

from ratelimitd.config import Config, resolve_secret
from ratelimitd.errors import StoreUnavailable
from ratelimitd.http import decisions
from ratelimitd.http.app_keys import CONFIG, REDIS_URL, SERVICES, Services
from ratelimitd.http.edge import (
    MAX_BODY_BYTES,
    SERVICE_TOKENS,
    Handler,
    api_handler,
    json_response,
    method_not_allowed,
    not_found,
)
from ratelimitd.http.openapi import openapi_spec
from ratelimitd.quota.engine import Engine, EngineSettings
from ratelimitd.store.connect import open_store
from ratelimitd.tokens import TokenCounter

log = logging.getLogger("ratelimitd.http")

# Threads that encode long prompts off the event loop (tiktoken releases the GIL): as many
# as the machines this runs on have cores to spare beside the loop.
TOKENIZER_THREADS: Final = 2


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    try:
        await services.engine.scripts.ready()
    except StoreUnavailable as exc:
        return json_response({"ready": False, "redis": f"unavailable ({exc})"}, 503)
    return json_response({"ready": True, "redis": "ok", "scripts": "loaded",
                          "config": services.config.source})


async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_spec())


ROUTES: Final[tuple[tuple[str, str, Handler], ...]] = (
    ("POST", "/v1/reserve", decisions.reserve),
    ("POST", "/v1/commit", decisions.commit),
    ("POST", "/v1/release", decisions.release),
    ("GET", "/healthz", healthz),
    ("GET", "/readyz", readyz),
    ("GET", "/openapi.json", openapi),
)


async def _services_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    store = open_store(config.redis, app[REDIS_URL])
    engine = Engine(store.transport,
                    EngineSettings(reservation_ttl_ms=config.reservations.ttl_s * 1000,
                                   commit_grace_ms=config.reservations.commit_grace_s * 1000,
                                   timezone=config.calendar.timezone))
    executor = ThreadPoolExecutor(max_workers=TOKENIZER_THREADS,
                                  thread_name_prefix="ratelimitd-tokens")
    app[SERVICES] = Services(
        config=config, store=store, engine=engine,
        counter=TokenCounter(config.tokens.default_encoding, config.tokens.models),
        prices=config.pricing.table(), executor=executor)
    try:
        await engine.scripts.load()
    except StoreUnavailable as exc:  # /readyz says so; the library loads on first use
        log.warning("could not load the function library at startup: %s", exc)
    yield
    executor.shutdown(wait=False, cancel_futures=True)
    await engine.aclose()
    await store.aclose()


def create_app(config: Config, redis_url: str) -> web.Application:
    app = web.Application(client_max_size=config.server.max_body_bytes)
    app[CONFIG] = config
    app[REDIS_URL] = redis_url
    app[MAX_BODY_BYTES] = config.server.max_body_bytes
    app[SERVICE_TOKENS] = tuple(resolve_secret(t).encode() for t in config.server.service_tokens)
    app.cleanup_ctx.append(_services_ctx)
    for method, path, handler in ROUTES:
        resource = app.router.add_resource(path)
        resource.add_route(method, api_handler(handler))
        resource.add_route("*", api_handler(method_not_allowed(method)))
    app.router.add_route("*", "/{tail:.*}", api_handler(not_found))
    return app
