"""Rate-limit response headers: IETF RateLimit-Policy / RateLimit and OpenAI's x-ratelimit-*."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Final

from ratelimitd.policy import Limit
from ratelimitd.quota.model import LimitState

# draft-ietf-httpapi-ratelimit-headers quota units ("qu"); the first two are registered there.
_QUOTA_UNITS: Final = {
    "requests": "requests", "concurrent": "concurrent-requests", "tokens": "tokens",
    "input_tokens": "input-tokens", "output_tokens": "output-tokens", "cost_usd": "nano-usd",
}
_PERIOD_S: Final = {"day": 86_400}
_TOKEN_METRICS: Final = ("tokens", "input_tokens", "output_tokens")
# OpenAI's headers of the tightest requests limit, then of the tightest tokens limit
_OPENAI_HEADERS: Final = tuple(
    (f"x-ratelimit-limit-{kind}", f"x-ratelimit-remaining-{kind}", f"x-ratelimit-reset-{kind}")
    for kind in ("requests", "tokens"))
# RFC 9651 3.3.1: an sf-integer has at most 15 digits. Config allows limits up to 10^15 (and
# cost limits up to 10^16 nano-USD), so quotas and remainders above this are written as it:
# "at least this much", which is what a client needs from a header.
SF_INTEGER_MAX: Final = 999_999_999_999_999
# Below this, (ms + 999) // 1000 is seconds_up(ms) (whose float division is exact enough) and
# far below SF_INTEGER_MAX
_EXACT_MS: Final = 2**52


def sf_integer(value: int) -> int:
    return max(-SF_INTEGER_MAX, min(SF_INTEGER_MAX, value))


def seconds_up(ms: int) -> int:
    return max(0, math.ceil(ms / 1000))


def go_duration(ms: int) -> str:
    """OpenAI's reset format: "20ms", "1s", "6m0s", "1h2m3s"."""
    if ms < 1000:
        return f"{ms}ms"
    seconds = math.ceil(ms / 1000)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def _window_s(lim: Limit) -> int | None:
    if lim.metric == "concurrent":
        return None
    if lim.algorithm == "calendar":
        return _PERIOD_S.get(lim.period)
    return lim.window_ms // 1000 or None


def _policy_item(lim: Limit) -> str:
    item = f'"{lim.name}";q={sf_integer(lim.capacity)}'
    window = _window_s(lim)
    if window:
        item += f";w={sf_integer(window)}"
    return f'{item};qu="{_QUOTA_UNITS[lim.metric]}"'


@functools.lru_cache(maxsize=4096)
def _policy(limits: tuple[Limit, ...]) -> str:
    """The RateLimit-Policy header of a set of limits; it only changes with the configuration."""
    return ", ".join([_policy_item(lim) for lim in limits])


def ratelimit_headers(states: Sequence[LimitState], retry_after_ms: int | None,
                      denied: bool) -> dict[str, str]:
    headers: dict[str, str] = {}
    if not states:
        return headers
    headers["RateLimit-Policy"] = _policy(tuple([s.limit for s in states]))
    # what sf_integer(remaining) and sf_integer(seconds_up(reset_ms)) give, without calls in
    # the common case (three a limit, on every answer)
    items = []
    for s in states:
        left, reset = s.remaining, s.reset_ms
        secs = (reset + 999) // 1000 if 0 <= reset < _EXACT_MS else sf_integer(seconds_up(reset))
        items.append(
            f'"{s.limit.name}";'
            f'r={left if -SF_INTEGER_MAX <= left <= SF_INTEGER_MAX else sf_integer(left)};t={secs}')
    headers["RateLimit"] = ", ".join(items)
    requests = tokens = None
    for state in states:  # the tightest requests limit and tokens limit, OpenAI-style
        metric = state.limit.metric
        if metric == "requests" and (requests is None or state.remaining < requests.remaining):
            requests = state
        elif metric in _TOKEN_METRICS and (tokens is None or state.remaining < tokens.remaining):
            tokens = state
    for (limit_name, remaining_name, reset_name), tightest in zip(
            _OPENAI_HEADERS, (requests, tokens), strict=True):
        if tightest is not None:
            headers[limit_name] = str(tightest.limit.limit)
            headers[remaining_name] = str(tightest.remaining)
            headers[reset_name] = go_duration(tightest.reset_ms)
    if denied and retry_after_ms is not None:
        headers["Retry-After"] = str(seconds_up(retry_after_ms))
    return headers
