"""What the handlers share, under the app's keys: built at startup, closed at shutdown."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from ratelimitd.auth import Access
from ratelimitd.config import Config
from ratelimitd.policy import PriceTable
from ratelimitd.quota.engine import Engine
from ratelimitd.store.connect import Store
from ratelimitd.tokenize import TokenCounter


@dataclass(frozen=True, slots=True)
class Services:
    config: Config
    store: Store
    engine: Engine
    counter: TokenCounter
    prices: PriceTable
    executor: ThreadPoolExecutor
    access: Access              # API keys, signatures, blocks (auth/, abuse/)
    # bearer tokens, resolved: reloaded with the configuration they come from
    service_tokens: tuple[bytes, ...] = ()
    admin_tokens: tuple[bytes, ...] = ()


class Live:
    """The services the handlers use, read per request: SIGHUP (http/reload.py) replaces them
    in one assignment (an aiohttp app is frozen once started; its keys cannot change). A
    request keeps the services it started with."""

    __slots__ = ("services",)
    services: Services


CONFIG: Final = web.AppKey("config", Config)
REDIS_URL: Final = web.AppKey("redis_url", str)
LIVE: Final = web.AppKey("live", Live)
