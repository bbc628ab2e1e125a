"""The access services of one daemon process (or one CLI command), built from the config.

Keys need the pepper ([keys] pepper, RATELIMITD_KEY_PEPPER or the credential key_pepper): without
one, `keys` is None and every key feature answers 503 keys_unavailable while the rest of the
daemon (identities, blocks, signatures of nothing) works. A pepper that is set but unusable is
a configuration error: the daemon refuses to start rather than run without the keys it has.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from ratelimitd.abuse import AuthFailureGuard, BlockStore
from ratelimitd.auth.keys import KeyPolicy, KeyStore, KeysUnavailableError, PepperError, load_pepper
from ratelimitd.auth.signatures import SignatureVerifier
from ratelimitd.config import Config
from ratelimitd.errors import ApiError, ConfigError
from ratelimitd.policy import Limit, PrefixLengths, sliding
from ratelimitd.store.connect import RedisClient, is_cluster
from ratelimitd.store.failures import DRIVER_FAILURES

log = logging.getLogger(__name__)

KEY_CREATION_LIMIT: Final = "key_creations_per_hour"
WARM_CONNECTIONS: Final = 8


@dataclass(frozen=True, slots=True)
class Access:
    keys: KeyStore | None            # None: no pepper, key features off
    blocks: BlockStore
    stuffing: AuthFailureGuard
    verifier: SignatureVerifier
    prefixes: PrefixLengths          # the ip_prefix scope's networks ([abuse])
    key_creations: Limit | None      # per ip_prefix, on POST /v1/admin/keys; None: no limit

    def require_keys(self) -> KeyStore:
        """The key store, or the 503 a daemon without a pepper answers."""
        if self.keys is None:
            raise ApiError(503, "keys_unavailable", str(KeysUnavailableError()))
        return self.keys

    async def aclose(self) -> None:
        if self.keys is not None:
            await self.keys.aclose()


async def open_access(config: Config, redis: RedisClient, *, listen: bool = True,
                      environ: Mapping[str, str] | None = None) -> Access:
    """The services on `redis` (the daemon's redis-py client). `listen`: subscribe to other
    daemons' key invalidations (a daemon does; a one-shot CLI command need not)."""
    try:
        pepper = load_pepper(config.keys.pepper, environ=environ)
    except PepperError as exc:
        raise ConfigError(f"key pepper: {exc}") from exc
    keys = (KeyStore(redis, pepper, KeyPolicy.from_config(config.keys),
                     known_tiers=config.tiers) if pepper is not None else None)
    abuse = config.abuse
    blocks = BlockStore(redis, ipv4_bits=abuse.ipv4_prefix, ipv6_bits=abuse.ipv6_prefix)
    per_hour = config.keys.creations_per_ip_prefix_per_hour
    access = Access(
        keys=keys, blocks=blocks,
        stuffing=AuthFailureGuard.from_config(redis, blocks, abuse),
        verifier=SignatureVerifier(redis, abuse.signature_max_age_s),
        prefixes=PrefixLengths(abuse.ipv4_prefix, abuse.ipv6_prefix),
        key_creations=(sliding(KEY_CREATION_LIMIT, "requests", "1h", per_hour,
                               scope="ip_prefix") if per_hour > 0 else None))
    if keys is not None and listen:
        await keys.start()   # returns within 2 s even when Redis is down (retries behind)
        await _warm_pool(redis)
    return access


async def _warm_pool(redis: RedisClient) -> None:
    """Opens WARM_CONNECTIONS connections now: a cold cache after a restart sends a burst of
    key lookups, which would otherwise open as many connections at once, each within the
    call's timeout. The pool keeps them; a failure here only costs that head start."""
    if is_cluster(redis):
        return
    try:
        await asyncio.gather(*(redis.ping() for _ in range(WARM_CONNECTIONS)))
    except DRIVER_FAILURES as exc:
        log.warning("could not open Redis connections for key lookups yet: %s",
                    type(exc).__name__)

