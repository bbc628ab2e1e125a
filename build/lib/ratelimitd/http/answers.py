"""The JSON answers of the decision endpoints, from the engine's results.

Amounts are shown in their metric's unit, money in USD: floats appear only here, at the edge.
"""

from __future__ import annotations

import functools
from typing import Any

from aiohttp import web

from ratelimitd.http.edge import json_response
from ratelimitd.http.headers import ratelimit_headers
from ratelimitd.policy import Limit
from ratelimitd.quota.engine import LimitState, ReserveResult, SettleResult
from ratelimitd.units import nano_to_usd


def _display(lim: Limit, amount: int) -> int | float:
    """Amounts at the JSON edge: money in USD, everything else as counted."""
    return nano_to_usd(amount) if lim.metric == "cost_usd" else amount


@functools.lru_cache(maxsize=4096)
def _limit_facts(lim: Limit) -> tuple[tuple[str, Any], ...]:
    """What an answer says of a limit that only changes with the configuration."""
    return (("name", lim.name), ("scope", lim.scope), ("metric", lim.metric),
            ("window", lim.window_text if lim.metric != "concurrent" else None),
            ("limit", _display(lim, lim.capacity)))


def limit_json(state: LimitState) -> dict[str, Any]:
    lim = state.limit
    answer = dict(_limit_facts(lim))
    answer["remaining"] = _display(lim, state.remaining)
    answer["reset_ms"] = state.reset_ms
    return answer


def reserve_answer(result: ReserveResult, dry_run: bool) -> web.Response:
    limits = [limit_json(s) for s in result.states]
    headers = ratelimit_headers(result.states, result.retry_after_ms, not result.allowed)
    if not result.allowed:
        assert result.denied_by is not None
        denied = result.denied_by.limit
        answer: dict[str, Any] = {"allowed": False, "reason": denied.name,
                                  "retry_after_ms": result.retry_after_ms, "limits": limits}
        if result.retry_after_ms is None:
            answer["message"] = (f"this call needs more than {denied.name} ever allows; "
                                 "retrying will not help")
        return json_response(answer, 429, headers)
    answer = {"allowed": True, "reservation_id": result.reservation_id or None,
              "expires_at_ms": result.expires_at_ms, "input_tokens": result.input_tokens,
              "max_output_tokens": result.max_output_tokens,
              "reserved": {"requests": 1,
                           "tokens": result.input_tokens + result.max_output_tokens,
                           "cost_usd": nano_to_usd(result.reserved_cost_nano)},
              "limits": limits, "warnings": [], "duplicate": result.duplicate}
    if dry_run:
        answer["dry_run"] = True
    return json_response(answer, 200, headers)


def degraded_answer(input_tokens: int, cap: int) -> web.Response:
    """[redis] on_error = "allow": admitted without a quota check, and said so."""
    return json_response({
        "allowed": True, "reservation_id": None, "degraded": True, "expires_at_ms": None,
        "input_tokens": input_tokens, "max_output_tokens": cap,
        "reserved": {"requests": 0, "tokens": 0, "cost_usd": 0.0}, "limits": [],
        "warnings": [{"code": "backend_unavailable",
                      "message": "the quota store did not answer; admitted unchecked by "
                                 "on_error = allow: nothing is charged (what the attempt "
                                 "reached is cancelled once Redis answers)"}],
        "duplicate": False})


def commit_answer(result: SettleResult) -> web.Response:
    answer: dict[str, Any] = {
        "committed": True, "duplicate": result.status == "duplicate",
        "cost_usd": nano_to_usd(result.cost_nano),
        "usage": {"input_tokens": result.input_tokens,
                  "cached_input_tokens": result.cached_input_tokens,
                  "output_tokens": result.output_tokens},
        "alerts": []}
    over_tokens = result.input_tokens + result.output_tokens - result.reserved_tokens
    over_cost = result.cost_nano - result.reserved_cost_nano
    if over_tokens > 0 or over_cost > 0:
        answer["overrun"] = {"tokens": max(0, over_tokens),
                             "cost_usd": nano_to_usd(max(0, over_cost))}
    return json_response(answer)
