"""Tiers, limits and prices from their TOML tables (the shapes the generic reader does not
know): the seed's shorthand, `[[tiers.X.limits]]`, and `[pricing]`."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, Final

from ratelimitd.config.model import PricingConfig
from ratelimitd.config.reader import Problems, Where, no_unknown, read_value
from ratelimitd.policy import (
    ANOMALY_ACTIONS,
    BUILTIN_SCOPES,
    CALENDAR_PERIODS,
    DEFAULT_PRICES,
    DEFAULT_SUB_BUCKETS,
    METRICS,
    AnomalyAction,
    Limit,
    ModelPrice,
    Tier,
    check_limits,
    shorthand_limits,
)
from ratelimitd.units import parse_duration, usd_to_nano

UNKNOWN_MODEL_CHOICES: Final = ("default", "deny")
_SHORTHAND_LIMITS: Final = ("requests_per_minute", "tokens_per_day", "daily_budget_usd",
                            "max_concurrent")
_SHORTHAND_CAPS: Final = ("max_output_tokens", "max_prompt_chars", "max_input_tokens")
_LIMIT_KEYS: Final = ("name", "scope", "metric", "window", "limit", "algorithm", "burst",
                       "shadow")
_NAME: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# The longest sliding or bucket window: every time the engine derives from it stays a whole
# number of ms far below what Redis and Lua's doubles hold exactly
MAX_WINDOW_MS: Final = 366 * 86_400_000


def _price(raw: Any, where: Where) -> ModelPrice:
    no_unknown(raw, ("input", "output", "cached_input"), where, " like { input = 3.0, ... }")
    for key in ("input", "output"):
        if key not in raw:
            raise where.error(f"needs {key} (USD per 1M tokens)")
    values: dict[str, float] = {}
    for key in ("input", "output", "cached_input"):
        if key in raw:
            values[key] = read_value(float, raw[key], where.at(key))
            if not 0 <= values[key] <= 1_000_000:
                raise where.at(key).error("must be between 0 and 1000000 USD per 1M tokens")
    return ModelPrice(**values)


def pricing(table: Any, where: Where) -> PricingConfig:
    if not isinstance(table, Mapping):
        raise where.error("must be a table")
    models = dict(DEFAULT_PRICES)
    defaults = PricingConfig()
    unknown_model, default = defaults.unknown_model, defaults.default
    for key, raw in table.items():
        if key == "unknown_model":
            unknown_model = read_value(str, raw, where.at(key))
            if unknown_model not in UNKNOWN_MODEL_CHOICES:
                raise where.at(key).error(f"must be default or deny, not {unknown_model!r}")
        elif key == "default":
            default = _price(raw, where.at(key))
        else:
            models[key] = _price(raw, where.at(key))
    return PricingConfig(unknown_model, default, models)


def tiers(table: Any, where: Where, declared: frozenset[str] = frozenset()) -> dict[str, Tier]:
    """The tiers; `declared`: attribute names ([attributes] names) a limit may scope by."""
    if not isinstance(table, Mapping) or not table:
        raise where.error("must name at least one tier, like [tiers.free]")
    problems = Problems()
    found = {}
    for name, raw in table.items():
        with problems.collect():
            found[name] = _tier(name, raw, where.at(name), declared)
    problems.raise_any()
    return found


def _tier(name: str, table: Any, where: Where, declared: frozenset[str]) -> Tier:
    if not _NAME.match(name):
        raise where.error("tier names use letters, digits, '_', '-' and '.'")
    if not isinstance(table, Mapping):
        raise where.error(f"must be a table, like [tiers.{name}]")
    problems = Problems()
    with problems.collect():
        no_unknown(table, [*_SHORTHAND_LIMITS, *_SHORTHAND_CAPS, "limits", "anomaly"], where,
                   "")
    anomaly: bool | AnomalyAction = True
    with problems.collect():
        anomaly = _anomaly(table.get("anomaly", True), where.at("anomaly"))
    numbers = {}
    for key in (*_SHORTHAND_LIMITS, *_SHORTHAND_CAPS):
        if key in table:
            with problems.collect():
                numbers[key] = _shorthand(key, table[key], where.at(key))
    limits = list(shorthand_limits(*(numbers.get(k) for k in _SHORTHAND_LIMITS)))
    raw_limits = table.get("limits", [])
    if not isinstance(raw_limits, list):
        with problems.collect():
            raise where.at("limits").error("must be an array of tables, like [[tiers.x.limits]]")
        raw_limits = []
    for i, raw in enumerate(raw_limits):
        with problems.collect():
            limits.append(_limit(raw, where.at(f"limits[{i}]"), declared))
    problems.raise_any()
    try:
        check_limits(limits)
    except ValueError as exc:
        raise where.at("limits").error(str(exc)) from exc
    return Tier(name, tuple(limits), max_output_tokens=numbers.get("max_output_tokens"),
                max_prompt_chars=numbers.get("max_prompt_chars"),
                max_input_tokens=numbers.get("max_input_tokens"), anomaly=anomaly)


def _shorthand(key: str, raw: Any, where: Where) -> Any:
    value = read_value(float if key == "daily_budget_usd" else int, raw, where)
    if value < 0 or (value == 0 and key != "daily_budget_usd"):
        raise where.error("must be positive")
    return value


def _anomaly(raw: Any, where: Where) -> bool | AnomalyAction:
    """true ([anomaly] action), false (no detection), or the tier's own action."""
    if isinstance(raw, bool):
        return raw
    for action in ANOMALY_ACTIONS:
        if raw == action:
            return action
    choices = " or ".join(f'"{a}"' for a in ANOMALY_ACTIONS)
    raise where.error(f"must be true, false, {choices}, not {raw!r}")


def _limit(table: Any, where: Where, declared: frozenset[str]) -> Limit:
    limit = _plain_limit(table, where, declared)
    if read_value(bool, table.get("shadow", False), where.at("shadow")):
        return dataclasses.replace(limit, shadow=True)
    return limit


def _plain_limit(table: Any, where: Where, declared: frozenset[str]) -> Limit:
    no_unknown(table, _LIMIT_KEYS, where, "")
    for key in ("name", "metric", "limit"):
        if key not in table:
            raise where.error(f"needs {key}")
    name = read_value(str, table["name"], where.at("name"))
    if not _NAME.match(name):
        raise where.at("name").error("use letters, digits, '_', '-' and '.' (at most 64)")
    scope = read_value(str, table.get("scope", "user"), where.at("scope"))
    if scope not in BUILTIN_SCOPES and scope not in declared:
        # a scope no request can name would silently never apply (a typo like "usr")
        raise where.at("scope").error(
            f"unknown scope {scope!r}: use one of {', '.join(BUILTIN_SCOPES)}, or an "
            "attribute name declared in [attributes] names"
            + (f" (declared: {', '.join(sorted(declared))})" if declared else ""))
    metric = read_value(str, table["metric"], where.at("metric"))
    if metric not in METRICS:
        raise where.at("metric").error(f"must be one of {', '.join(METRICS)}")
    algorithm = read_value(str, table.get("algorithm", "sliding"), where.at("algorithm"))
    if algorithm not in ("sliding", "token_bucket"):
        raise where.at("algorithm").error("must be sliding or token_bucket")
    amount = _amount(metric, table["limit"], where.at("limit"))
    if metric == "concurrent":
        if algorithm != "sliding" or "window" in table or "burst" in table:
            raise where.error("a concurrent limit takes no window, burst or algorithm: it counts "
                              "in-flight reservations")
        return Limit(name, scope, "concurrent", amount, "sliding")
    window = read_value(str, table.get("window", ""), where.at("window"))
    if window in CALENDAR_PERIODS:
        if algorithm != "sliding" or "burst" in table:
            raise where.at("window").error("a calendar window (day, month, year) is a budget; "
                                           "it takes no token_bucket or burst")
        return Limit(name, scope, metric, amount, "calendar", period=window)
    try:
        window_ms = parse_duration(window)
    except ValueError as exc:
        raise where.at("window").error(f"{exc}, or day / month") from exc
    if window_ms > MAX_WINDOW_MS:
        raise where.at("window").error(f"{window!r} is longer than the longest window, 366d; "
                                       "a longer budget is a calendar month")
    if algorithm == "token_bucket":
        burst = _amount(metric, table.get("burst", table["limit"]), where.at("burst"))
        return Limit(name, scope, metric, amount, "token_bucket",
                     window_ms=window_ms, burst=burst)
    if "burst" in table:
        raise where.at("burst").error("only a token_bucket limit has a burst")
    if window_ms < DEFAULT_SUB_BUCKETS:
        raise where.at("window").error(
            f"{window!r} is too short for a sliding window: it is kept as {DEFAULT_SUB_BUCKETS} "
            f"sub-buckets of at least 1 ms (conservative by at most 1/{DEFAULT_SUB_BUCKETS} of "
            f"the window), so it must be at least {DEFAULT_SUB_BUCKETS}ms")
    return Limit(name, scope, metric, amount, "sliding", window_ms=window_ms,
                 buckets=DEFAULT_SUB_BUCKETS)


def _amount(metric: str, raw: Any, where: Where) -> int:
    """A limit in its metric's integer unit: USD become nano-USD."""
    if metric == "cost_usd":
        usd = read_value(float, raw, where)
        if not 0 < usd <= 1e7:
            raise where.error("must be more than 0 and at most 10000000 USD")
        return usd_to_nano(usd)
    value = read_value(int, raw, where)
    if not 0 < value <= 10**15:
        raise where.error("must be a whole number from 1 to 10^15")
    return int(value)
