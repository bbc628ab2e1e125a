"""The JSON answers of the decision endpoints, from the engine's results.

Amounts are shown in their metric's unit, money in USD: floats appear only here, at the edge.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from ratelimitd.abuse import blocked_error
from ratelimitd.alerts import Alert
from ratelimitd.errors import ApiError
from ratelimitd.http.edge import JsonAnswer
from ratelimitd.http.headers import ratelimit_headers, seconds_up
from ratelimitd.policy import Limit
from ratelimitd.quota.model import LimitState, ReserveResult, SettleResult
from ratelimitd.units import nano_to_usd


def _display(lim: Limit, amount: int) -> int | float:
    """Amounts at the JSON edge: money in USD, everything else as counted."""
    return nano_to_usd(amount) if lim.metric == "cost_usd" else amount


@functools.lru_cache(maxsize=4096)
def _limit_facts(lim: Limit) -> dict[str, Any]:
    """What an answer says of a limit that only changes with the configuration (copied, never
    changed)."""
    return {"name": lim.name, "scope": lim.scope, "metric": lim.metric,
            "window": lim.window_text if lim.metric != "concurrent" else None,
            "limit": _display(lim, lim.capacity)}


def limit_json(state: LimitState) -> dict[str, Any]:
    lim = state.limit
    answer = _limit_facts(lim).copy()
    # _display, written out: once per limit of every answer
    answer["remaining"] = (nano_to_usd(state.remaining) if lim.metric == "cost_usd"
                           else state.remaining)
    answer["reset_ms"] = state.reset_ms
    if lim.shadow:  # counted, never denies: "over" says whether it would have denied
        answer["shadow"] = True
        answer["over"] = state.over
    return answer


def _never_fits(limit: Limit) -> ApiError:
    """A call larger than a limit's whole capacity: no wait admits it, so not a 429."""
    window = "in flight" if limit.metric == "concurrent" else f"per {limit.window_text}"
    amount = _display(limit, limit.capacity)
    unit = "USD" if limit.metric == "cost_usd" else limit.metric
    return ApiError(400, "exceeds_limit",
                    f"this call needs more than the limit {limit.name} ever allows ({amount} "
                    f"{unit} {window}, scope {limit.scope}); retrying will not help: ask for "
                    "fewer tokens (input or max_output_tokens)")


def reserve_answer(result: ReserveResult, dry_run: bool,
                   warnings: Sequence[dict[str, str]] = ()) -> JsonAnswer:
    """200 allowed; 429 denied; 400 exceeds_limit when the call can never fit a limit; a
    blocked subject raises 403 blocked. `warnings` (an API key's key_expiring, key_rotated)
    ride on 200 and 429."""
    if result.blocked is not None:
        blocked = result.blocked
        raise blocked_error(blocked.subject, blocked.retry_after_ms, blocked.reason)
    if not result.allowed:
        assert result.denied_by is not None
        denied = result.denied_by.limit
        if result.retry_after_ms is None:
            raise _never_fits(denied)
        retry_ms: int = result.retry_after_ms
        answer: dict[str, Any] = {"allowed": False, "reason": denied.name}
        if denied.metric == "concurrent":
            # the hint is the latest a slot surely frees (decided in reserve.lua)
            answer["message"] = (
                f"{denied.name}: {denied.limit} calls in flight; a slot frees when one of them "
                "is committed or released, and at the latest when its reservation expires "
                f"(within {seconds_up(retry_ms)} s, the Retry-After)")
        headers = ratelimit_headers(result.states, retry_ms, True)
        answer["retry_after_ms"] = retry_ms
        answer["limits"] = [limit_json(s) for s in result.states]
        if warnings:
            answer["warnings"] = list(warnings)
        return JsonAnswer(answer, 429, headers)
    limits = [limit_json(s) for s in result.states]
    headers = ratelimit_headers(result.states, None, False)
    answer = {"allowed": True, "reservation_id": result.reservation_id or None,
              "expires_at_ms": result.expires_at_ms, "input_tokens": result.input_tokens,
              "max_output_tokens": result.max_output_tokens,
              "reserved": {"requests": 1,
                           "tokens": result.input_tokens + result.max_output_tokens,
                           "cost_usd": nano_to_usd(result.reserved_cost_nano)},
              "limits": limits, "warnings": list(warnings), "duplicate": result.duplicate}
    if dry_run:
        answer["dry_run"] = True
    return JsonAnswer(answer, 200, headers)


def degraded_answer(input_tokens: int, cap: int) -> JsonAnswer:
    """[redis] on_error = "allow": admitted without a quota check, and said so."""
    return JsonAnswer({
        "allowed": True, "reservation_id": None, "degraded": True, "expires_at_ms": None,
        "input_tokens": input_tokens, "max_output_tokens": cap,
        "reserved": {"requests": 0, "tokens": 0, "cost_usd": 0.0}, "limits": [],
        "warnings": [{"code": "backend_unavailable",
                      "message": "the quota store did not answer; admitted unchecked by "
                                 "on_error = allow: nothing is charged (what the attempt "
                                 "reached is cancelled once Redis answers)"}],
        "duplicate": False})


def commit_answer(result: SettleResult, alerts: list[Alert] | None = None) -> JsonAnswer:
    answer: dict[str, Any] = {
        "committed": True, "duplicate": result.status == "duplicate",
        "cost_usd": nano_to_usd(result.cost_nano),
        "usage": {"input_tokens": result.input_tokens,
                  "cached_input_tokens": result.cached_input_tokens,
                  "output_tokens": result.output_tokens},
        "alerts": [a.to_json() for a in alerts or ()]}
    if result.replicated is not None:
        answer["replicated"] = result.replicated
    over_tokens = result.input_tokens + result.output_tokens - result.reserved_tokens
    over_cost = result.cost_nano - result.reserved_cost_nano
    if over_tokens > 0 or over_cost > 0:
        answer["overrun"] = {"tokens": max(0, over_tokens),
                             "cost_usd": nano_to_usd(max(0, over_cost))}
    return JsonAnswer(answer)
