"""What the handlers share, under the app's keys: built at startup, closed at shutdown."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from ratelimitd.access import Access
from ratelimitd.config import Config
from ratelimitd.policy import PriceTable
from ratelimitd.quota.engine import Engine
from ratelimitd.store.connect import Store
from ratelimitd.tokens import TokenCounter


@dataclass(frozen=True, slots=True)
class Services:
    config: Config
    store: Store
    engine: Engine
    counter: TokenCounter
    prices: PriceTable
    executor: ThreadPoolExecutor
    access: Access              # API keys, signatures, blocks (access/)


CONFIG: Final = web.AppKey("config", Config)
REDIS_URL: Final = web.AppKey("redis_url", str)
SERVICES: Final = web.AppKey("services", Services)
