"""SIGHUP in a serving process: re-read the configuration file and swap in what derives from
it, in one assignment (app_keys.Live), while requests keep flowing.

Swapped: tiers and their limits, caps and prices (the whole `Config` the handlers read), the
token counter, the service and admin tokens, the metrics' allowed labels. Kept: the Redis
connections and the function library, the engine's settings ([reservations] ttl, [alerts],
[anomaly], [calendar] timezone), the key store and the listeners: those need a restart (not
done on reload; the line logged says so). An invalid file is one error line; the old
configuration stays.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from aiohttp import web

from ratelimitd.config import load_config
from ratelimitd.errors import ConfigError
from ratelimitd.http.app import resolved_tokens
from ratelimitd.http.app_keys import LIVE
from ratelimitd.http.observe import METRICS, shadow_limit_names
from ratelimitd.tokenize import TokenCounter

log = logging.getLogger("ratelimitd")
NEEDS_RESTART = ("server.listen", "redis", "reservations", "alerts", "anomaly", "calendar")


async def reload_config(app: web.Application) -> bool:
    """True when the new configuration is in use; False (logged) when the old one stays."""
    live = app[LIVE]
    path = live.services.config.source
    if path.startswith("<"):
        log.warning("SIGHUP: no configuration file to reload (built-in defaults)")
        return False
    try:  # off the loop: validating loads encodings, requests keep being answered meanwhile
        config = await asyncio.get_running_loop().run_in_executor(None, load_config, path)
        service_tokens, admin_tokens = resolved_tokens(config)
        counter = TokenCounter(config.tokens.default_encoding, config.tokens.models,
                               config.tokens.image_tokens)
    except ConfigError as exc:
        log.error("reload failed, keeping the configuration in use: %s", exc,
                  extra={"event": "reload", "ok": False})
        return False
    old = live.services
    live.services = dataclasses.replace(old, config=config, counter=counter,
                                        prices=config.pricing.table(),
                                        service_tokens=service_tokens,
                                        admin_tokens=admin_tokens)
    app[METRICS].reconfigure(config.tiers, config.pricing.models,
                             {lim.name for tier in config.tiers.values() for lim in tier.limits},
                             shadow_limits=shadow_limit_names(config))
    log.info("reloaded %s (%d tiers: %s); changes to %s need a restart", path,
             len(config.tiers), ", ".join(config.tiers), ", ".join(NEEDS_RESTART),
             extra={"event": "reload", "ok": True})
    return True

