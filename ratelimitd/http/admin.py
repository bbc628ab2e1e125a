"""The admin API (docs/http-api.md): API keys and blocks.

Every route here is under /v1/admin/, so the edge asks for an admin token (auth/bearer.py).
Inputs are checked before anything is stored or spent: a refused call changes nothing in Redis.

Key creation from a client-facing sign-up flow is the multi-account pattern (one actor, many
free accounts), so when the body names the end user's `attributes.ip`, creations are counted
per `ip_prefix` network by the quota engine itself, with the limit
`[keys] creations_per_ip_prefix_per_hour` (429 too_many_key_creations past it; a blocked
network answers 403 blocked). The count is reserved before the key is made and released if
making it fails.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any, Final

from aiohttp import web

from ratelimitd.abuse import BlockInputError, InvalidIpError, blocked_error, canonical_ip, ip_prefix
from ratelimitd.auth.keys import KeyInputError, KeyNotFoundError, KeyStateError
from ratelimitd.errors import ApiError, invalid
from ratelimitd.http.app_keys import LIVE, Services
from ratelimitd.http.edge import Handler, json_response, read_json
from ratelimitd.policy import Prices, Subject
from ratelimitd.quota.model import ReserveRequest
from ratelimitd.store.failures import store_failures

CREATE_FIELDS: Final = frozenset({"user", "tier", "org", "expires_in_days",
                                  "require_signature", "attributes"})
ROTATE_FIELDS: Final = frozenset({"grace_s"})
BLOCK_FIELDS: Final = frozenset({"scope", "id", "ttl_s", "reason"})
_FREE: Final = Prices(input=0, output=0, cached_input=0)


@contextlib.contextmanager
def _admin_errors() -> Iterator[None]:
    """The libraries' refusals as the API's answers."""
    try:
        yield
    except (KeyInputError, BlockInputError) as exc:
        raise invalid(exc.field, exc.problem) from exc
    except KeyNotFoundError as exc:
        raise ApiError(404, "key_not_found", f"key_id: {exc}") from exc
    except KeyStateError as exc:
        raise ApiError(409, exc.code, f"key_id: {exc.message}") from exc


async def _body(request: web.Request, allowed: frozenset[str], *,
                optional: bool = False) -> Mapping[str, Any]:
    if optional and not request.body_exists:
        return {}
    data = await read_json(request)
    if not isinstance(data, dict):
        raise invalid("body", "must be a JSON object")
    for name in data:
        if name not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise invalid(name, f"unknown field (known: {known})")
    return data


def _caller_ip(body: Mapping[str, Any]) -> str | None:
    """The end user's address when the body names it (`attributes.ip`), canonical."""
    attributes = body.get("attributes")
    if attributes is None:
        return None
    if not isinstance(attributes, dict) or not all(isinstance(v, str)
                                                   for v in attributes.values()):
        raise invalid("attributes", "must be an object of strings")
    if "ip" not in attributes:
        return None
    try:
        return canonical_ip(attributes["ip"])
    except InvalidIpError as exc:
        raise invalid("attributes.ip", str(exc).removeprefix("attributes.ip: ")) from exc


# -- keys --------------------------------------------------------------------------------------

async def create_key(request: web.Request) -> web.Response:
    services = request.app[LIVE].services
    keys = services.access.require_keys()
    body = await _body(request, CREATE_FIELDS)
    # checked by check_create, before anything is spent
    user: Any = body.get("user")
    tier: Any = body.get("tier")
    org: Any = body.get("org")
    expires_in_days: Any = body.get("expires_in_days")
    signed: Any = body.get("require_signature", False)
    with _admin_errors():
        keys.check_create(user, tier, org, expires_in_days, signed)
    ip = _caller_ip(body)
    ticket = await _count_creation(services, ip) if ip is not None else None
    try:
        with _admin_errors():
            async with store_failures():
                created = await keys.create(user, tier, org,
                                            expires_in_days, signed)
    except BaseException:
        if ticket is not None:
            await services.engine.release(ticket)
        raise
    if ticket is not None:
        await services.engine.commit(ticket, 0, 0)
    return json_response(created.to_json(), 201)


async def _count_creation(services: Services, ip: str) -> str | None:
    """Counts one key creation for the caller's network: the reservation id, or None when
    creations are not limited; 429 past the limit, 403 when the network is blocked."""
    limit = services.access.key_creations
    if limit is None:
        return None
    prefixes = services.access.prefixes
    network = Subject("ip_prefix", ip_prefix(ip, prefixes.ipv4, prefixes.ipv6))
    result = await services.engine.reserve(ReserveRequest(
        [(network, (limit,))], 0, 0, _FREE, min_output_tokens=0,
        guards=[Subject("ip", ip)]))
    if result.blocked is not None:
        raise blocked_error(result.blocked.subject, result.blocked.retry_after_ms,
                            result.blocked.reason)
    if not result.allowed:
        seconds = max(1, math.ceil((result.retry_after_ms or 0) / 1000))
        raise ApiError(429, "too_many_key_creations",
                       f"attributes.ip: {network.id} made {limit.limit} keys in the last hour "
                       f"([keys] creations_per_ip_prefix_per_hour); retry in {seconds} s",
                       {"Retry-After": str(seconds)})
    return result.reservation_id


async def rotate_key(request: web.Request) -> web.Response:
    keys = request.app[LIVE].services.access.require_keys()
    body = await _body(request, ROTATE_FIELDS, optional=True)
    with _admin_errors():
        async with store_failures():
            rotated = await keys.rotate(request.match_info["key_id"], body.get("grace_s"))
    return json_response(rotated.to_json(), 201)


async def revoke_key(request: web.Request) -> web.Response:
    keys = request.app[LIVE].services.access.require_keys()
    await _body(request, frozenset(), optional=True)
    with _admin_errors():
        async with store_failures():
            await keys.revoke(request.match_info["key_id"])
    return json_response({"revoked": True})


async def show_key(request: web.Request) -> web.Response:
    keys = request.app[LIVE].services.access.require_keys()
    with _admin_errors():
        async with store_failures():
            info = await keys.show(request.match_info["key_id"])
    return json_response(info.to_json())


# -- blocks ------------------------------------------------------------------------------------

def _block_subject(services: Services, scope: object, ident: object) -> Subject:
    if scope == "global":
        raise invalid("scope", "a global block would refuse every call and is not offered; "
                               "use a global limit, or stop the gateway")
    with _admin_errors():
        return services.access.blocks.subject(scope, ident)


async def add_block(request: web.Request) -> web.Response:
    services = request.app[LIVE].services
    body = await _body(request, BLOCK_FIELDS)
    for name in ("scope", "id", "ttl_s", "reason"):
        if name not in body:
            raise invalid(name, "is required")
    subject = _block_subject(services, body["scope"], body["id"])
    with _admin_errors():
        async with store_failures():
            block = await services.access.blocks.add(subject, body["ttl_s"], body["reason"])
    return json_response(block.to_json(), 201)


async def remove_block(request: web.Request) -> web.Response:
    services = request.app[LIVE].services
    query = request.query
    for name in ("scope", "id"):
        if name not in query:
            raise invalid(name, "is required (a query parameter: ?scope=user&id=u1)")
    subject = _block_subject(services, query["scope"], query["id"])
    async with store_failures():
        removed = await services.access.blocks.remove(subject)
    return json_response({"removed": removed})


async def list_blocks(request: web.Request) -> web.Response:
    services = request.app[LIVE].services
    raw = request.query.get("limit", "1000")
    if not raw.isdigit():
        raise invalid("limit", "must be a whole number from 1 to 10000")
    with _admin_errors():
        async with store_failures():
            blocks = await services.access.blocks.list(int(raw))
    return json_response({"blocks": [b.to_json() for b in blocks]})


ROUTES: Final[tuple[tuple[str, str, Handler], ...]] = (
    ("POST", "/v1/admin/keys", create_key),
    ("POST", "/v1/admin/keys/{key_id}/rotate", rotate_key),
    ("POST", "/v1/admin/keys/{key_id}/revoke", revoke_key),
    ("GET", "/v1/admin/keys/{key_id}", show_key),
    ("POST", "/v1/admin/blocks", add_block),
    ("DELETE", "/v1/admin/blocks", remove_block),
    ("GET", "/v1/admin/blocks", list_blocks),
)
