"""Configuration: the TOML file of API.md, every key defaulted, every mistake named.

`load_config(path)` returns a frozen `Config`; a missing key takes its default, an unknown key
or a bad value raises `ConfigError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ratelimitd.policy import (
    BUILTIN_SCOPES,
    CALENDAR_PERIODS,
    DEFAULT_SUB_BUCKETS,
    METRICS,
    Limit,
    Tier,
    check_limits,
    default_tiers,
    parse_duration,
    shorthand_limits,
    usd_to_nano,
)
from ratelimitd.tokens import EncodingUnavailableError, load_encoding


class ConfigError(ValueError):
    """A configuration mistake; the message names the file and the key."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: tuple[str, ...] = ("127.0.0.1:8080",)
    service_tokens: tuple[str, ...] = ()
    admin_tokens: tuple[str, ...] = ()
    max_body_bytes: int = 1_048_576


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str = ""
    data_dir: str = ""
    mode: str = "standalone"
    timeout_ms: int = 100
    on_error: str = "deny"


@dataclass(frozen=True, slots=True)
class ReservationsConfig:
    ttl_s: int = 300
    min_output_tokens: int = 16
    # output cap reserved when neither the request nor the tier names one
    default_max_output_tokens: int = 4096


@dataclass(frozen=True, slots=True)
class TokensConfig:
    default_encoding: str = "o200k_base"
    models: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per 1M tokens."""

    input: float
    output: float
    cached_input: float | None = None


DEFAULT_PRICES: Final = {
    "gpt-4": ModelPrice(30.0, 60.0),
    "gpt-3.5-turbo": ModelPrice(1.5, 2.0),
    "claude-3-opus": ModelPrice(15.0, 75.0),
    "gpt-4o": ModelPrice(2.5, 10.0, 1.25),
}


@dataclass(frozen=True, slots=True)
class PricingConfig:
    unknown_model: str = "default"
    default: ModelPrice = ModelPrice(3.0, 15.0)
    models: Mapping[str, ModelPrice] = field(default_factory=lambda: dict(DEFAULT_PRICES))


@dataclass(frozen=True, slots=True)
class CalendarConfig:
    timezone: str = "UTC"


@dataclass(frozen=True, slots=True)
class KeysConfig:
    max_age_days: int = 90
    warn_days: int = 14
    rotation_grace_s: int = 86_400


@dataclass(frozen=True, slots=True)
class AbuseConfig:
    auth_failures_per_ip: int = 20
    block_s: int = 900
    signature_max_age_s: int = 300


@dataclass(frozen=True, slots=True)
class AnomalyConfig:
    request_spike_factor: float = 5.0
    token_spike_factor: float = 3.0
    block_s: int = 900


@dataclass(frozen=True, slots=True)
class AlertsConfig:
    thresholds: tuple[float, ...] = (0.5, 0.8, 1.0)
    webhooks: tuple[str, ...] = ()
    webhook_secret: str = ""               # HMAC key of the signature header; "env:NAME" too
    webhook_timeout_ms: int = 5000         # per POST
    queue_size: int = 10_000               # alerts waiting for the outbox, per daemon
    retry_max_s: int = 60                  # cap of the exponential backoff between attempts
    delivery_max_age_s: int = 86_400       # an alert not delivered by then is dropped (counted)
    stream_max_len: int = 100_000          # the outbox stream's cap (approximate, MAXLEN ~)


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = ServerConfig()
    redis: RedisConfig = RedisConfig()
    reservations: ReservationsConfig = ReservationsConfig()
    tokens: TokensConfig = TokensConfig()
    pricing: PricingConfig = PricingConfig()
    tiers: Mapping[str, Tier] = field(default_factory=default_tiers)
    calendar: CalendarConfig = CalendarConfig()
    keys: KeysConfig = KeysConfig()
    abuse: AbuseConfig = AbuseConfig()
    anomaly: AnomalyConfig = AnomalyConfig()
    alerts: AlertsConfig = AlertsConfig()
    source: str = "<defaults>"


# Sections read field by field from their dataclass; tiers and pricing have shapes of their own.
_SECTIONS: Final[dict[str, type[Any]]] = {
    "server": ServerConfig, "redis": RedisConfig, "reservations": ReservationsConfig,
    "tokens": TokensConfig, "calendar": CalendarConfig, "keys": KeysConfig,
    "abuse": AbuseConfig, "anomaly": AnomalyConfig, "alerts": AlertsConfig,
}
_CHOICES: Final = {
    ("redis", "mode"): ("standalone", "cluster", "sentinel"),
    ("redis", "on_error"): ("deny", "allow"),
    ("pricing", "unknown_model"): ("default", "deny"),
}
_SHORTHAND_LIMITS: Final = ("requests_per_minute", "tokens_per_day", "daily_budget_usd",
                            "max_concurrent")
_SHORTHAND_CAPS: Final = ("max_output_tokens", "max_prompt_chars", "max_input_tokens")
_LIMIT_KEYS: Final = ("name", "scope", "metric", "window", "limit", "algorithm", "burst")
_NAME: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def load_config(path: str | Path | None) -> Config:
    """Reads and checks a configuration file; None (or an empty file) gives every default."""
    if path is None:
        return Config()
    source = str(path)
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    return parse_config(data, source)


def parse_config(data: Mapping[str, Any], source: str = "<config>") -> Config:
    where = _Where(source)
    _no_unknown(data, [*_SECTIONS, "pricing", "tiers"], where, "")
    sections = {name: _section(cls, data.get(name, {}), where.at(name))
                for name, cls in _SECTIONS.items()}
    config = Config(
        **sections,
        pricing=_pricing(data.get("pricing", {}), where.at("pricing")),
        tiers=_tiers(data["tiers"], where.at("tiers")) if "tiers" in data else default_tiers(),
        source=source,
    )
    _check(config, where)
    return config


@dataclass(frozen=True, slots=True)
class _Where:
    """Where a value sits, for error messages: file and dotted key."""

    source: str
    key: str = ""

    def at(self, key: str) -> _Where:
        return _Where(self.source, f"{self.key}.{key}" if self.key else key)

    def error(self, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.key or 'top level'}: {problem}")


def _no_unknown(table: Mapping[str, Any], known: typing.Iterable[str], where: _Where,
                what: str) -> None:
    if not isinstance(table, Mapping):
        raise where.error(f"must be a table{what}")
    allowed = set(known)
    for key in table:
        if key not in allowed:
            raise where.at(key).error(f"unknown key (known: {', '.join(sorted(allowed))})")


def _section(cls: type[Any], table: Any, where: _Where) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _no_unknown(table, fields, where, "")
    hints = typing.get_type_hints(cls)
    values = {key: _value(hints[key], raw, where.at(key)) for key, raw in table.items()}
    section = where.key
    for key, value in values.items():
        choices = _CHOICES.get((section, key))
        if choices and value not in choices:
            raise where.at(key).error(f"must be one of {', '.join(choices)}, not {value!r}")
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise where.at(key).error("must not be negative")
    return cls(**values)


def _value(hint: Any, raw: Any, where: _Where) -> Any:
    """Checks a TOML value against a field's type; tuples come from arrays."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(raw, bool):
            raise where.error(f"must be true or false, not {raw!r}")
        return raw
    if hint is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise where.error(f"must be a whole number, not {raw!r}")
        return raw
    if hint is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise where.error(f"must be a number, not {raw!r}")
        return float(raw)
    if hint is str:
        if not isinstance(raw, str):
            raise where.error(f"must be a string, not {raw!r}")
        return raw
    if origin is tuple:
        if not isinstance(raw, list):
            raise where.error(f"must be an array, not {raw!r}")
        item = typing.get_args(hint)[0]
        return tuple(_value(item, x, where.at(str(i))) for i, x in enumerate(raw))
    if origin in (Mapping, dict, typing.Mapping):
        if not isinstance(raw, Mapping):
            raise where.error(f"must be a table, not {raw!r}")
        item = typing.get_args(hint)[1]
        return {k: _value(item, v, where.at(k)) for k, v in raw.items()}
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return _value(inner[0], raw, where)
    raise where.error(f"unsupported setting type {hint!r}")  # pragma: no cover


def _price(raw: Any, where: _Where) -> ModelPrice:
    _no_unknown(raw, ("input", "output", "cached_input"), where, " like { input = 3.0, ... }")
    for key in ("input", "output"):
        if key not in raw:
            raise where.error(f"needs {key} (USD per 1M tokens)")
    values: dict[str, float] = {}
    for key in ("input", "output", "cached_input"):
        if key in raw:
            values[key] = _value(float, raw[key], where.at(key))
            if not 0 <= values[key] <= 1_000_000:
                raise where.at(key).error("must be between 0 and 1000000 USD per 1M tokens")
    return ModelPrice(**values)


def _pricing(table: Any, where: _Where) -> PricingConfig:
    if not isinstance(table, Mapping):
        raise where.error("must be a table")
    models = dict(DEFAULT_PRICES)
    defaults = PricingConfig()
    unknown_model, default = defaults.unknown_model, defaults.default
    for key, raw in table.items():
        if key == "unknown_model":
            unknown_model = _value(str, raw, where.at(key))
            if unknown_model not in _CHOICES[("pricing", "unknown_model")]:
                raise where.at(key).error(f"must be default or deny, not {unknown_model!r}")
        elif key == "default":
            default = _price(raw, where.at(key))
        else:
            models[key] = _price(raw, where.at(key))
    return PricingConfig(unknown_model, default, models)


def _tiers(table: Any, where: _Where) -> dict[str, Tier]:
    if not isinstance(table, Mapping) or not table:
        raise where.error("must name at least one tier, like [tiers.free]")
    return {name: _tier(name, raw, where.at(name)) for name, raw in table.items()}


def _tier(name: str, table: Any, where: _Where) -> Tier:
    if not _NAME.match(name):
        raise where.error("tier names use letters, digits, '_', '-' and '.'")
    _no_unknown(table, [*_SHORTHAND_LIMITS, *_SHORTHAND_CAPS, "limits"], where, "")
    numbers = {}
    for key in (*_SHORTHAND_LIMITS, *_SHORTHAND_CAPS):
        if key in table:
            value = _value(float if key == "daily_budget_usd" else int, table[key], where.at(key))
            if value < 0 or (value == 0 and key != "daily_budget_usd"):
                raise where.at(key).error("must be positive")
            numbers[key] = value
    limits = list(shorthand_limits(*(numbers.get(k) for k in _SHORTHAND_LIMITS)))
    raw_limits = table.get("limits", [])
    if not isinstance(raw_limits, list):
        raise where.at("limits").error("must be an array of tables, like [[tiers.x.limits]]")
    limits += [_limit(raw, where.at(f"limits[{i}]")) for i, raw in enumerate(raw_limits)]
    try:
        check_limits(limits)
    except ValueError as exc:
        raise where.at("limits").error(str(exc)) from exc
    return Tier(name, tuple(limits), *(numbers.get(k) for k in _SHORTHAND_CAPS))


def _limit(table: Any, where: _Where) -> Limit:
    _no_unknown(table, _LIMIT_KEYS, where, "")
    for key in ("name", "metric", "limit"):
        if key not in table:
            raise where.error(f"needs {key}")
    name = _value(str, table["name"], where.at("name"))
    if not _NAME.match(name):
        raise where.at("name").error("use letters, digits, '_', '-' and '.' (at most 64)")
    scope = _value(str, table.get("scope", "user"), where.at("scope"))
    if scope not in BUILTIN_SCOPES and not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", scope):
        raise where.at("scope").error(f"must be one of {', '.join(BUILTIN_SCOPES)} or an "
                                      "attribute name (lowercase letters, digits, '_')")
    metric = _value(str, table["metric"], where.at("metric"))
    if metric not in METRICS:
        raise where.at("metric").error(f"must be one of {', '.join(METRICS)}")
    algorithm = _value(str, table.get("algorithm", "sliding"), where.at("algorithm"))
    if algorithm not in ("sliding", "token_bucket"):
        raise where.at("algorithm").error("must be sliding or token_bucket")
    amount = _amount(metric, table["limit"], where.at("limit"))
    if metric == "concurrent":
        if algorithm != "sliding" or "window" in table or "burst" in table:
            raise where.error("a concurrent limit takes no window, burst or algorithm: it counts "
                              "in-flight reservations")
        return Limit(name, scope, "concurrent", amount, "sliding")
    window = _value(str, table.get("window", ""), where.at("window"))
    if window in CALENDAR_PERIODS:
        if algorithm != "sliding" or "burst" in table:
            raise where.at("window").error("a calendar window (day, month) is a budget; "
                                           "it takes no token_bucket or burst")
        return Limit(name, scope, metric, amount, "calendar", period=window)
    try:
        window_ms = parse_duration(window)
    except ValueError as exc:
        raise where.at("window").error(f"{exc}, or day / month") from exc
    if algorithm == "token_bucket":
        burst = _amount(metric, table.get("burst", table["limit"]), where.at("burst"))
        return Limit(name, scope, metric, amount, "token_bucket",
                     window_ms=window_ms, burst=burst)
    if "burst" in table:
        raise where.at("burst").error("only a token_bucket limit has a burst")
    buckets = max(d for d in range(1, DEFAULT_SUB_BUCKETS + 1) if window_ms % d == 0)
    return Limit(name, scope, metric, amount, "sliding",
                 window_ms=window_ms, buckets=buckets)


def _amount(metric: str, raw: Any, where: _Where) -> int:
    """A limit in its metric's integer unit: USD become nano-USD."""
    if metric == "cost_usd":
        usd = _value(float, raw, where)
        if not 0 < usd <= 1e7:
            raise where.error("must be more than 0 and at most 10000000 USD")
        return usd_to_nano(usd)
    value = _value(int, raw, where)
    if not 0 < value <= 10**15:
        raise where.error("must be a whole number from 1 to 10^15")
    return int(value)


def _check(config: Config, where: _Where) -> None:
    """Checks that span keys or need the environment."""
    for key, tokens in (("service_tokens", config.server.service_tokens),
                        ("admin_tokens", config.server.admin_tokens)):
        for i, token in enumerate(tokens):
            resolve_secret(token, where.at("server").at(key).at(str(i)))
    for i, listen in enumerate(config.server.listen):
        tcp = re.fullmatch(r"\[?[^\s\]]+\]?:(\d{1,5})", listen)
        if not listen.startswith("unix:") and (tcp is None or int(tcp.group(1)) > 65_535):
            raise where.at("server.listen").at(str(i)).error(
                f"{listen!r}: use host:port (port 0 to 65535) or unix:/path/to.sock")
    if not config.server.listen:
        raise where.at("server.listen").error("needs at least one address")
    # the daemon loads these at startup: a name that cannot load offline is a bad value here
    encodings = [(where.at("tokens.default_encoding"), config.tokens.default_encoding)]
    encodings += [(where.at("tokens.models").at(m), e) for m, e in config.tokens.models.items()]
    for at, encoding in encodings:
        try:
            load_encoding(encoding)
        except EncodingUnavailableError as exc:
            raise at.error(str(exc)) from exc
    try:
        ZoneInfo(config.calendar.timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise where.at("calendar.timezone").error(
            f"unknown timezone {config.calendar.timezone!r}") from exc
    if config.reservations.ttl_s < 1:
        raise where.at("reservations.ttl_s").error("must be at least 1 second")
    if config.redis.timeout_ms < 1:
        raise where.at("redis.timeout_ms").error("must be at least 1 ms")
    if config.redis.mode == "cluster" and not config.redis.url:
        raise where.at("redis.url").error("cluster mode needs the url of a cluster node")
    if config.redis.mode == "sentinel" and not config.redis.url.startswith("redis+sentinel://"):
        raise where.at("redis.url").error(
            "sentinel mode needs redis+sentinel://host:port[,host:port]/service_name")
    if config.server.max_body_bytes < 1024:
        raise where.at("server.max_body_bytes").error("must be at least 1024")
    if any(not 0 < t <= 1 for t in config.alerts.thresholds):
        raise where.at("alerts.thresholds").error("each threshold is a fraction in (0, 1]")
    _check_alerts(config.alerts, where.at("alerts"))


def _check_alerts(alerts: AlertsConfig, where: _Where) -> None:
    """Webhook URLs are http(s) with a host, each once; signing them needs a secret."""
    for i, url in enumerate(alerts.webhooks):
        if not _is_webhook_url(url):
            # the URL may carry a token: the message names its index, never its text
            raise where.at("webhooks").at(str(i)).error("must be an http:// or https:// URL "
                                                        "with a host")
        if url in alerts.webhooks[:i]:
            raise where.at("webhooks").at(str(i)).error("is listed twice")
    if alerts.webhooks and not alerts.webhook_secret:
        raise where.at("webhook_secret").error("webhooks are signed: set a secret (or env:NAME)")
    if alerts.webhook_secret:
        secret = resolve_secret(alerts.webhook_secret, where.at("webhook_secret"))
        if len(secret) < 16:
            raise where.at("webhook_secret").error("must be at least 16 characters")
    for key in ("webhook_timeout_ms", "queue_size", "retry_max_s", "delivery_max_age_s",
                "stream_max_len"):
        if getattr(alerts, key) < 1:
            raise where.at(key).error("must be at least 1")


def _is_webhook_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        _ = parts.port  # a port out of range raises here
    except ValueError:
        return False
    return (parts.scheme in ("http", "https") and bool(parts.hostname)
            and not any(c.isspace() for c in url))


def resolve_secret(value: str, where: _Where | None = None) -> str:
    """A token as configured: "env:NAME" reads the environment variable NAME."""
    if not value.startswith("env:"):
        if not value:
            raise (where or _Where("<config>")).error("an empty token would let anyone in")
        return value
    name = value[4:]
    secret = os.environ.get(name, "")
    if not secret:
        raise (where or _Where("<config>")).error(f"environment variable {name} is not set")
    return secret
