"""The decision endpoints: /v1/reserve, /v1/commit, /v1/release.

Thin handlers: parse (schema.py), identify the caller (auth/: an API key, its signature),
resolve the tier, price and count, ask the engine, shape the answer (answers.py). Quota
decisions are made in lua/ through the engine only.
"""

from __future__ import annotations

import time

from aiohttp import web

from ratelimitd.abuse import block_guards
from ratelimitd.auth import Caller, identify
from ratelimitd.errors import (
    ApiError,
    CountingQueueFull,
    IdempotencyKeyReused,
    ReserveInProgress,
    StoreUnavailable,
    TokenCountError,
    invalid,
)
from ratelimitd.http import observe
from ratelimitd.http.alerting import ALERTING, after_reserve, budget_warnings
from ratelimitd.http.answers import commit_answer, degraded_answer, reserve_answer
from ratelimitd.http.app_keys import LIVE, Services
from ratelimitd.http.edge import CLIENT_LOG, ApiRequest, JsonAnswer, read_json
from ratelimitd.http.observe import METRICS, REDIS_CALLS
from ratelimitd.http.schema import (
    ReserveBody,
    parse_commit,
    parse_release,
    parse_reserve,
    prompt_chars,
)
from ratelimitd.ops.metrics import Metrics
from ratelimitd.policy import Identity, plan
from ratelimitd.quota.model import ReserveRequest, ReserveResult


async def _input_tokens(services: Services, body: ReserveBody, max_chars: int | None,
                        who: Identity) -> int:
    if body.input_tokens is not None:
        return body.input_tokens
    field = "prompt" if body.prompt is not None else "messages"
    try:  # validated first, so a malformed message is named, not called empty
        texts = services.counter.prepare(body.model, body.prompt, body.messages, body.tools)
    except TokenCountError as exc:
        raise ApiError(400, "invalid_request", str(exc)) from exc
    if not texts.has_content:
        raise invalid(field, "is empty: it holds no text, image or tool call", "empty_prompt")
    chars = prompt_chars(body)
    if max_chars is not None and chars > max_chars:
        raise invalid(field, f"{chars} characters; this tier allows {max_chars}",
                      "prompt_too_long")
    # long prompts take turns per caller: an API key, else a user
    caller = f"key:{who.key_id}" if who.key_id is not None else f"user:{who.user}"
    try:
        return await services.counter.count(body.model, texts, services.executor, caller)
    except CountingQueueFull as exc:
        raise ApiError(429, "counting_queue_full", f"{field}: {exc}; retry shortly",
                       {"Retry-After": "1"}) from exc


async def reserve(request: ApiRequest) -> JsonAnswer:
    """Every outcome is counted once: an answer by its result, an error by its code (and the
    caller's tier, once known)."""
    app = request.app  # a property of three calls: read once a request
    services, metrics = app[LIVE].services, app[METRICS]
    tier_name: str | None = None
    try:
        body = parse_reserve(await read_json(request))
        caller = await identify(services.access, api_key=body.api_key, signature=body.signature,
                                user=body.user, tier=body.tier, org=body.org,
                                attributes=body.attributes or {})
        tier_name = caller.identity.tier
        return await _reserve(app, services, metrics, body, caller)
    except ApiError as err:
        observe.refused(metrics, err, tier_name)
        raise
    except StoreUnavailable:
        metrics.decision("error", "backend_unavailable", tier_name)
        raise


async def _reserve(app: web.Application, services: Services, metrics: Metrics,
                   body: ReserveBody, caller: Caller) -> JsonAnswer:
    config = services.config
    who = caller.identity
    tier = config.tiers.get(who.tier)
    if tier is None:
        field = "tier" if body.api_key is None else "api_key"
        raise invalid(field, f"unknown tier {who.tier!r} (known: {', '.join(config.tiers)})")
    prices = services.prices.for_model(body.model)
    if prices is None:
        raise invalid("model", f"unknown model {body.model!r}; its price is not configured",
                      "unknown_model")
    input_tokens = await _input_tokens(services, body, tier.max_prompt_chars, who)
    if tier.max_input_tokens is not None and input_tokens > tier.max_input_tokens:
        raise invalid("input_tokens", f"{input_tokens} input tokens; this tier allows "
                      f"{tier.max_input_tokens}", "too_many_input_tokens")
    cap = tier.output_cap(body.max_output_tokens, config.reservations.default_max_output_tokens)
    subjects = plan(tier, who, services.access.prefixes)
    reservation = ReserveRequest(
        subjects, input_tokens, cap, prices,
        min_output_tokens=(body.min_output_tokens if body.min_output_tokens is not None
                           else config.reservations.min_output_tokens),
        idempotency_key=body.idempotency_key, dry_run=body.dry_run, anomaly=tier.anomaly,
        guards=block_guards(subjects, who, services.access.prefixes))
    call = app[REDIS_CALLS].reserve
    start = time.perf_counter()
    try:
        result = await services.engine.reserve(reservation)
    except ReserveInProgress as exc:
        raise ApiError(409, "idempotency_key_in_use", f"idempotency_key: {exc}",
                       {"Retry-After": "1"}) from exc
    except IdempotencyKeyReused as exc:
        raise ApiError(422, "idempotency_key_reused", f"idempotency_key: {exc}") from exc
    except StoreUnavailable as exc:
        observe.store_failed(call, exc)
        if config.redis.on_error != "allow":
            raise
        app[CLIENT_LOG].warning("redis_unavailable_allowed",
                                "redis unavailable, admitting by on_error=allow: %s", exc)
        metrics.decision("degraded", "backend_unavailable", who.tier)
        return degraded_answer(input_tokens, cap)
    finally:
        call.observe(time.perf_counter() - start)
    _count_reserve(metrics, result, who.tier, body.model, body.dry_run)
    app[observe.SHADOW_REPORT].reserve(result)
    if result.alerts:
        for alert in await after_reserve(app, result):
            metrics.alert(alert.kind, alert.severity)
            if alert.kind == "request_spike" and result.blocked is not None:
                metrics.block(result.blocked.subject.scope, "anomaly")
    warnings = [*caller.warnings,
                *budget_warnings(result.states, app[ALERTING].thresholds)]
    return reserve_answer(result, body.dry_run, warnings)


def _count_reserve(metrics: Metrics, result: ReserveResult, tier: str, model: str,
                   dry_run: bool) -> None:
    if result.allowed:
        metrics.decision("allowed", None, tier)
        if not dry_run and not result.duplicate:
            metrics.reserved(tier, model, result.input_tokens + result.max_output_tokens,
                             result.reserved_cost_nano)
    elif result.blocked is not None:
        metrics.decision("blocked", "blocked", tier)
    else:
        denied = result.denied_by
        metrics.decision("denied", denied.limit.name if denied is not None else None, tier)


async def commit(request: ApiRequest) -> JsonAnswer:
    app = request.app
    services = app[LIVE].services
    body = parse_commit(await read_json(request))
    output = body.output_tokens
    if output is None:  # output_text: counted with the commit's model, else the default encoding
        text = body.output_text or ""
        output = await services.counter.count_prompt(body.model or "", text, None,
                                                     services.executor) if text else 0
    call, metrics = app[REDIS_CALLS].commit, app[METRICS]
    start = time.perf_counter()
    try:
        result = await services.engine.commit(body.reservation_id, body.input_tokens, output,
                                              body.cached_input_tokens)
    except StoreUnavailable as exc:
        observe.store_failed(call, exc)
        raise
    finally:
        call.observe(time.perf_counter() - start)
    if result.status == "applied":
        # the engine's answer does not carry the reservation's tier: counted as "other"
        used = result.input_tokens + result.output_tokens
        metrics.committed(None, body.model, used, result.cost_nano,
                          max(0, used - result.reserved_tokens))
    if result.status == "not_found":
        metrics.expired()
        reservations = services.config.reservations
        raise ApiError(404, "reservation_not_found",
                       f"reservation_id: unknown, or expired (reservations live "
                       f"{reservations.ttl_s} s, and take a late commit "
                       f"{reservations.commit_grace_s} s more)")
    if result.status == "conflict":
        raise ApiError(409, "reservation_released",
                       "reservation_id: this reservation was released; it cannot be committed")
    if result.replicated is False:
        metrics.unreplicated("commit")
    alerts = app[ALERTING].forward(result.alerts)
    if result.status == "applied":
        for alert in alerts:
            metrics.alert(alert.kind, alert.severity)
    return commit_answer(result, alerts)


async def release(request: ApiRequest) -> JsonAnswer:
    app = request.app
    services = app[LIVE].services
    rid = parse_release(await read_json(request))
    call, metrics = app[REDIS_CALLS].release, app[METRICS]
    start = time.perf_counter()
    try:
        result = await services.engine.release(rid)
    except StoreUnavailable as exc:
        observe.store_failed(call, exc)
        raise
    finally:
        call.observe(time.perf_counter() - start)
    if result.status == "applied":
        metrics.released()
    if result.status == "not_found":
        metrics.expired()
        raise ApiError(404, "reservation_not_found", "reservation_id: unknown, or expired")
    if result.status == "conflict":
        raise ApiError(409, "reservation_committed",
                       "reservation_id: this reservation was committed; it cannot be released")
    answer = {"released": True, "duplicate": result.status == "duplicate"}
    if result.replicated is not None:
        answer["replicated"] = result.replicated
        if not result.replicated:
            metrics.unreplicated("release")
    return JsonAnswer(answer)
