"""A reserve's caller: the identity the gateway vouches for, or the one its API key names.

With an `api_key`, in this order (docs/keys.md says why):
1. no pepper on this daemon: 503 keys_unavailable;
2. resolve the key (no Redis call on a cache hit, one on a miss);
3. a refused key from a request with `attributes.ip` counts one failed lookup for that address
   (abuse/stuffing.py); past the threshold the address is blocked: 403 blocked. Otherwise the
   key's own answer: malformed and unknown keys 401 invalid_api_key (one message), revoked 403
   key_revoked, expired 403 key_expired (docs/errors.md);
4. a key that requires signatures, or a request that sends one, has its signature verified
   (401 invalid_signature); an authentic one stores its nonce (one Redis call), so a replay on
   any daemon is refused. A refused signature counts as a failure of the address too, as a
   refused key does (guessing signatures for a known key is stuffing as well).
The key's warnings (key_expiring, key_rotated) go on the answer. Blocks of the key, the org and
the address are checked by the reserve itself (abuse/guards.py).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from ratelimitd.abuse.guards import blocked_error
from ratelimitd.auth.keys import KeyFailure, ResolvedKey
from ratelimitd.auth.services import Access
from ratelimitd.auth.signatures import SignatureError
from ratelimitd.errors import ApiError
from ratelimitd.policy import Identity
from ratelimitd.store.failures import store_failures


@dataclass(slots=True)
class Caller:
    identity: Identity
    warnings: list[dict[str, str]] = field(default_factory=list)


async def identify(access: Access, *, api_key: str | None, signature: object,
                   user: str, tier: str, org: str | None,
                   attributes: Mapping[str, str]) -> Caller:
    """The caller of a reserve, or the ApiError that refuses it (nothing reserved)."""
    if api_key is None:
        return Caller(Identity(user, tier, org, None, attributes))
    keys = access.require_keys()
    async with store_failures():
        resolved = await keys.resolve(api_key)
        if isinstance(resolved, KeyFailure):
            raise await _refused(access, ApiError(resolved.status, resolved.code,
                                                  resolved.message), attributes.get("ip"))
        if resolved.require_signature or signature is not None:
            try:
                await _verify_signature(access, resolved, signature)
            except ApiError as err:
                raise await _refused(access, err, attributes.get("ip")) from None
    return Caller(resolved.identity(attributes), [w.to_json() for w in resolved.warnings])


async def _refused(access: Access, failure: ApiError, ip: str | None) -> ApiError:
    """The answer to a refused key or signature (`failure`, unless the address is blocked
    now); counts the failure against the client's address."""
    if ip is not None:
        outcome = await access.stuffing.record_failure(ip)
        if outcome.block is not None:
            block = outcome.block
            # the block's end is in Redis time; this daemon's clock only rounds Retry-After
            left = block.ends_at_ms - time.time_ns() // 1_000_000
            return blocked_error(block.subject, max(left, 1), block.reason)
    return failure


async def _verify_signature(access: Access, key: ResolvedKey, signature: object) -> None:
    if key.signing_secret is None:
        raise ApiError(401, "invalid_signature",
                       "signature: this key has no signing secret (it was created without "
                       "require_signature); send no signature with it")
    try:
        await access.verifier.verify(signature, key.signing_secret, key.key_id,
                                     now_ms=time.time_ns() // 1_000_000)
    except SignatureError as exc:
        raise ApiError(exc.status, exc.code, exc.message) from exc
