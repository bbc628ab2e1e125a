"""Loading a configuration: `load_config(path)` reads the TOML file, `parse_config(data)`
checks every section and the rules that span keys, and returns a frozen `Config`."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ratelimitd.config import tiers as tier_tables
from ratelimitd.config.model import (
    AbuseConfig,
    AlertsConfig,
    AnomalyConfig,
    CalendarConfig,
    Config,
    KeysConfig,
    RedisConfig,
    ReservationsConfig,
    ServerConfig,
    TokensConfig,
)
from ratelimitd.config.reader import Where, no_unknown, section
from ratelimitd.errors import ConfigError, EncodingUnavailableError
from ratelimitd.policy import default_tiers
from ratelimitd.tokens.offline import check_encoding_name

# Sections read field by field from their dataclass; tiers and pricing have shapes of their own.
_SECTIONS: Final[dict[str, type[Any]]] = {
    "server": ServerConfig, "redis": RedisConfig, "reservations": ReservationsConfig,
    "tokens": TokensConfig, "calendar": CalendarConfig, "keys": KeysConfig,
    "abuse": AbuseConfig, "anomaly": AnomalyConfig, "alerts": AlertsConfig,
}
# A reservation lives at most a week (its concurrency slot with it)
MAX_RESERVATION_TTL_S: Final = 7 * 86_400
_CHOICES: Final[dict[str, dict[str, tuple[str, ...]]]] = {
    "redis": {"mode": ("standalone", "cluster", "sentinel"), "on_error": ("deny", "allow")},
}


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
    where = Where(source)
    no_unknown(data, [*_SECTIONS, "pricing", "tiers"], where, "")
    sections = {name: section(cls, data.get(name, {}), where.at(name), _CHOICES.get(name))
                for name, cls in _SECTIONS.items()}
    config = Config(
        **sections,
        pricing=tier_tables.pricing(data.get("pricing", {}), where.at("pricing")),
        tiers=(tier_tables.tiers(data["tiers"], where.at("tiers")) if "tiers" in data
               else default_tiers()),
        source=source,
    )
    _check(config, where)
    return config


def _check(config: Config, where: Where) -> None:
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
            check_encoding_name(encoding)
        except EncodingUnavailableError as exc:
            raise at.error(str(exc)) from exc
    try:
        ZoneInfo(config.calendar.timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise where.at("calendar.timezone").error(
            f"unknown timezone {config.calendar.timezone!r}") from exc
    if not 1 <= config.reservations.ttl_s <= MAX_RESERVATION_TTL_S:
        raise where.at("reservations.ttl_s").error(
            f"must be from 1 to {MAX_RESERVATION_TTL_S} seconds")
    if config.reservations.commit_grace_s > MAX_RESERVATION_TTL_S:
        raise where.at("reservations.commit_grace_s").error(
            f"must be at most {MAX_RESERVATION_TTL_S} seconds")
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


def resolve_secret(value: str, where: Where | None = None) -> str:
    """A token as configured: "env:NAME" reads the environment variable NAME."""
    if not value.startswith("env:"):
        if not value:
            raise (where or Where("<config>")).error("an empty token would let anyone in")
        return value
    name = value[4:]
    secret = os.environ.get(name, "")
    if not secret:
        raise (where or Where("<config>")).error(f"environment variable {name} is not set")
    return secret
