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
    seconds = (ms + 999) // 1000 if ms < _EXACT_MS else math.ceil(ms / 1000)
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m{secs}s"


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
    # One pass (this runs on every answer): each limit's item, written as sf_integer(remaining)
    # and sf_integer(seconds_up(reset_ms)) give them without calls in the common case; and
    # the tightest requests limit and tokens limit, OpenAI-style.
    items = []
    requests = tokens = None
    for state in states:
        left, reset = state.remaining, state.reset_ms
        secs = (reset + 999) // 1000 if 0 <= reset < _EXACT_MS else sf_integer(seconds_up(reset))
        items.append(
            f'"{state.limit.name}";'
            f'r={left if -SF_INTEGER_MAX <= left <= SF_INTEGER_MAX else sf_integer(left)};t={secs}')
        metric = state.limit.metric
        if metric == "requests":
            if requests is None or left < requests.remaining:
                requests = state
        elif metric in _TOKEN_METRICS and (tokens is None or left < tokens.remaining):
            tokens = state
    headers["RateLimit"] = ", ".join(items)
    if requests is not None:
        headers["x-ratelimit-limit-requests"] = str(requests.limit.limit)
        headers["x-ratelimit-remaining-requests"] = str(requests.remaining)
        headers["x-ratelimit-reset-requests"] = go_duration(requests.reset_ms)
    if tokens is not None:
        headers["x-ratelimit-limit-tokens"] = str(tokens.limit.limit)
        headers["x-ratelimit-remaining-tokens"] = str(tokens.remaining)
        headers["x-ratelimit-reset-tokens"] = go_duration(tokens.reset_ms)
    if denied and retry_after_ms is not None:
        headers["Retry-After"] = str(seconds_up(retry_after_ms))
    return headers
