"""GET /v1/admin/usage?scope=user&id=u1[&tier=pro]: one subject's usage, for operators.

Answers each configured limit of that scope (of every tier, or of `tier` when given) with what
is used, the limit, what remains and when it resets, read in one read-only Lua call per eight
limits (ReserveMode.PEEK: nothing is charged or changed); then the subject's recent alerts
(`rl:{<tag>}:alerts`, newest first) and its block, if one holds.

Admin auth: `[server] admin_tokens`, `Authorization: Bearer`, compared in constant time with
every token. The admin routes of the keys work (http/admin.py) share this rule; when both are
merged they should share one check.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from ratelimitd.abuse.blocks import BlockInputError, BlockStore
from ratelimitd.alerts import recent_alerts
from ratelimitd.errors import invalid
from ratelimitd.http.alerting import ALERTING
from ratelimitd.http.answers import _display
from ratelimitd.http.app_keys import LIVE
from ratelimitd.http.edge import json_response
from ratelimitd.policy import Limit, Tier


def limits_of_scope(tiers: Mapping[str, Tier], scope: str) -> list[tuple[Limit, list[str]]]:
    """Every distinct limit of `scope` in `tiers`, with the tiers that have it."""
    found: dict[Limit, list[str]] = {}
    for tier in tiers.values():
        for lim in tier.limits:
            if lim.scope == scope:
                found.setdefault(lim, []).append(tier.name)
    return list(found.items())


async def usage(request: web.Request) -> web.Response:
    services = request.app[LIVE].services
    config = services.config
    query = request.query
    tiers = config.tiers
    if "tier" in query:
        if query["tier"] not in tiers:
            raise invalid("tier", f"unknown tier {query['tier']!r} (known: {', '.join(tiers)})")
        tiers = {query["tier"]: tiers[query["tier"]]}
    blocks = BlockStore(services.store.client, ipv4_bits=config.abuse.ipv4_prefix,
                        ipv6_bits=config.abuse.ipv6_prefix)
    try:
        subject = blocks.subject(query.get("scope"), query.get("id"))
    except BlockInputError as exc:
        raise invalid(exc.field, exc.problem) from exc
    entries = limits_of_scope(tiers, subject.scope)
    # limits of one lid share their state: each is read once
    distinct: dict[str, Limit] = {}
    for lim, _ in entries:
        distinct.setdefault(lim.lid, lim)
    peek = await services.engine.peek(subject, list(distinct.values()))
    used = {lid: (u, r) for lid, u, r in zip(distinct, peek.used, peek.reset_ms, strict=True)}
    alerts = await recent_alerts(services.store.client, subject)
    names = request.app[ALERTING].names
    return json_response({
        "subject": {"scope": subject.scope, "id": subject.id},
        "limits": [_limit_usage(lim, names_of_tiers, *used[lim.lid])
                   for lim, names_of_tiers in entries],
        "alerts": [names.name(a).to_json() for a in alerts],
        "block": _block(peek.block_reason, peek.block_ms_left),
    })


def _limit_usage(lim: Limit, tiers: list[str], used: int, reset_ms: int) -> dict[str, Any]:
    used = max(0, used)
    return {"name": lim.name, "scope": lim.scope, "metric": lim.metric,
            "window": lim.window_text if lim.metric != "concurrent" else None,
            "limit": _display(lim, lim.capacity), "used": _display(lim, used),
            "remaining": _display(lim, max(0, lim.capacity - used)), "reset_ms": reset_ms,
            "tiers": tiers}


def _block(reason: str | None, ms_left: int) -> dict[str, Any] | None:
    if reason is None:
        return None
    return {"reason": reason, "retry_after_ms": ms_left,
            "expires_at_ms": time.time_ns() // 1_000_000 + ms_left}



# The route's part of /openapi.json (http/openapi.py merges it)
OPENAPI_SCHEMAS: dict[str, Any] = {
    "Usage": {
        "type": "object", "additionalProperties": False,
        "required": ["subject", "limits", "alerts", "block"],
        "properties": {
            "subject": {"type": "object", "required": ["scope", "id"],
                        "properties": {"scope": {"type": "string"}, "id": {"type": "string"}}},
            "limits": {"type": "array", "items": {
                "type": "object", "additionalProperties": False,
                "required": ["name", "scope", "metric", "window", "limit", "used", "remaining",
                             "reset_ms", "tiers"],
                "properties": {
                    "name": {"type": "string"}, "scope": {"type": "string"},
                    "metric": {"type": "string"}, "window": {"type": ["string", "null"]},
                    "limit": {"type": "number"}, "used": {"type": "number"},
                    "remaining": {"type": "number"}, "reset_ms": {"type": "integer"},
                    "tiers": {"type": "array", "items": {"type": "string"}}}}},
            "alerts": {"type": "array", "items": {"type": "object"},
                       "description": "newest first, as webhooks receive them"},
            "block": {"type": ["object", "null"],
                      "properties": {"reason": {"type": "string"},
                                     "retry_after_ms": {"type": "integer"},
                                     "expires_at_ms": {"type": "integer"}}}},
    },
}
OPENAPI_PATH: dict[str, Any] = {"get": {
    "summary": "A subject's usage of every limit of its scope, recent alerts and block",
    "security": [{"adminToken": []}],
    "parameters": [
        {"name": "scope", "in": "query", "required": True, "schema": {"type": "string"}},
        {"name": "id", "in": "query", "required": True, "schema": {"type": "string"}},
        {"name": "tier", "in": "query", "required": False, "schema": {"type": "string"}}],
    "responses": {
        "200": {"description": "the subject's usage", "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Usage"}}}},
        **{str(status): {"description": f"error; codes: {codes}", "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
           for status, codes in ((400, "invalid_request"),
                                 (401, "missing_credentials, invalid_admin_token"),
                                 (403, "admin_token_required"), (503, "backend_unavailable"))}}}}
