"""Loading a configuration: `load_config(path)` reads the TOML file, `parse_config(data)`
checks every section and the rules that span keys, and returns a frozen `Config`."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ratelimitd.config import credentials
from ratelimitd.config import tiers as tier_tables
from ratelimitd.config.credentials import MIN_TOKEN_BYTES
from ratelimitd.config.envoy_rules import load_rules
from ratelimitd.config.model import (
    MIN_PEPPER_BYTES,
    AbuseConfig,
    AlertsConfig,
    AnomalyConfig,
    AttributesConfig,
    CalendarConfig,
    Config,
    EnvoyConfig,
    GrpcConfig,
    KeysConfig,
    PricingConfig,
    RedisConfig,
    ReservationsConfig,
    ServerConfig,
    TokensConfig,
)
from ratelimitd.config.reader import (
    ConfigProblem,
    ConfigProblems,
    Problems,
    Where,
    no_unknown,
    section,
)
from ratelimitd.errors import ConfigError, EncodingUnavailableError
from ratelimitd.policy import ANOMALY_ACTIONS, Tier, default_tiers
from ratelimitd.tokenize.offline import check_encoding_name

# Sections read field by field from their dataclass; tiers and pricing have shapes of their own.
_SECTIONS: Final[dict[str, type[Any]]] = {
    "server": ServerConfig, "redis": RedisConfig, "reservations": ReservationsConfig,
    "tokens": TokensConfig, "calendar": CalendarConfig, "keys": KeysConfig,
    "abuse": AbuseConfig, "anomaly": AnomalyConfig, "alerts": AlertsConfig,
    "attributes": AttributesConfig, "grpc": GrpcConfig, "envoy": EnvoyConfig,
}
MAX_ALERT_THRESHOLDS: Final = 16
MAX_ANOMALY_BLOCK_S: Final = 7 * 86_400
# a subject's active hours are counted up to this (lua/anomaly.lua, one byte)
MAX_HISTORY_HOURS: Final = 255
# A reservation lives at most a week (its concurrency slot with it)
MAX_RESERVATION_TTL_S: Final = 7 * 86_400
_URL_SCHEMES: Final = ("redis://", "rediss://", "unix://")
_ATTRIBUTE_NAME: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")
_CHOICES: Final[dict[str, dict[str, tuple[str, ...]]]] = {
    "redis": {"mode": ("standalone", "cluster", "sentinel"), "on_error": ("deny", "allow")},
}


def load_config(path: str | Path | None, *, secrets: bool = True) -> Config:
    """Reads and checks a configuration file; None (or an empty file) gives every default.
    secrets=False leaves the secret references unresolved (a command that uses none of them
    runs without the environment or credentials the daemon has)."""
    if path is None:
        return Config()
    source = str(path)
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read: {getattr(exc, 'strerror', None) or exc}"
                          ) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # its message ends "(at line N, column M)"
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    try:
        return parse_config(data, source, secrets=secrets)
    except ConfigProblems as exc:
        located = sorted((_with_line(p, text) for p in exc.problems),
                         key=lambda p: p.line if isinstance(p, ConfigProblem) else 0)
        raise ConfigProblems(located) from None
    except ConfigProblem as exc:
        raise _with_line(exc, text) from None


def parse_config(data: Mapping[str, Any], source: str = "<config>", *,
                 secrets: bool = True) -> Config:
    """Checks every section and rule; every mistake is reported (ConfigProblems when more
    than one), each naming the file and the dotted key."""
    where = Where(source)
    problems = Problems()
    with problems.collect():
        no_unknown(data, [*_SECTIONS, "pricing", "tiers"], where, "")
    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        sections[name] = section(cls, data.get(name, {}), where.at(name), problems,
                                 _CHOICES.get(name))
    declared = frozenset(sections["attributes"].names)
    tables: dict[str, Any] = {"tiers": default_tiers(), "pricing": PricingConfig()}
    with problems.collect():
        tables["pricing"] = tier_tables.pricing(data.get("pricing", {}), where.at("pricing"))
    if "tiers" in data:
        with problems.collect():
            tables["tiers"] = tier_tables.tiers(data["tiers"], where.at("tiers"), declared)
    if sections["server"].shadow_mode:
        tables["tiers"] = _all_shadow(tables["tiers"])
    if sections["envoy"].config:
        with problems.collect():
            base = Path(source).parent if not source.startswith("<") else Path.cwd()
            tables["envoy_rules"] = load_rules(sections["envoy"].config, base)
    config = Config(**sections, **tables, source=source)
    in_error = {p.key for p in problems.found if isinstance(p, ConfigProblem)}
    for check in (*_CHECKS, *(_SECRET_CHECKS if secrets else ())):
        with problems.collect():
            for problem in check(config, where):
                # a key already in error took its default: a check of it would mislead
                if not (isinstance(problem, ConfigProblem) and problem.key in in_error):
                    problems.found.append(problem)
    problems.raise_any()
    return config


def _all_shadow(tiers: Mapping[str, Tier]) -> dict[str, Tier]:
    """[server] shadow_mode: every limit of every tier counts and reports, never denies."""
    return {name: dataclasses.replace(
        tier, limits=tuple(dataclasses.replace(lim, shadow=True) for lim in tier.limits))
        for name, tier in tiers.items()}


def _with_line(problem: ConfigError, text: str) -> ConfigError:
    if not isinstance(problem, ConfigProblem):
        return problem
    line = locate_key(text, problem.key)
    if line is None:
        return problem
    return ConfigProblem(f"{problem} (line {line})", problem.key, line)


_HEADER: Final = re.compile(r"^\[\[\s*(.+?)\s*\]\]|^\[\s*(.+?)\s*\]")
_BARE_OR_QUOTED: Final = r"""(?:"[^"]*"|'[^']*'|[A-Za-z0-9_-]+)"""
_KEY: Final = re.compile(rf"^({_BARE_OR_QUOTED}(?:\s*\.\s*{_BARE_OR_QUOTED})*)\s*=")
_PART: Final = re.compile(r""""([^"]*)"|'([^']*)'|([A-Za-z0-9_-]+)""")


def _key_parts(dotted: str) -> list[str]:
    return [next(g for g in m.groups() if g is not None) for m in _PART.finditer(dotted)]


def locate_key(text: str, key: str) -> int | None:
    """The line of `text` (TOML) that sets `key` ("tiers.free.limits[0].scope"), or of the
    nearest table above it; None when no line names it. A best effort for messages: TOML
    parsers keep no positions."""
    target = _normalised(_key_parts(re.sub(r"\[(\d+)\]", r".__\1", key)))
    table: list[str] = []
    arrays: dict[tuple[str, ...], int] = {}
    best, best_line = 0, None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        header = _HEADER.match(stripped)
        if header is not None:
            parts = _key_parts(header.group(1) or header.group(2))
            if header.group(1) is not None:  # [[array]]: its nth table is name[n]
                index = arrays.get(tuple(parts), -1) + 1
                arrays[tuple(parts)] = index
                parts = [*parts, f"__{index}"]
            table, path = parts, parts
        elif (assignment := _KEY.match(stripped)) is not None:
            path = [*table, *_key_parts(assignment.group(1))]
        else:
            continue
        if len(path) > best and path == target[:len(path)]:
            best, best_line = len(path), number
    return best_line


def _normalised(parts: list[str]) -> list[str]:
    """Indices into arrays of values ("listen.0") point at the key's line: dropped."""
    return [p for p in parts if not p.isdigit()]


def _check_tokens(config: Config, where: Where) -> Iterator[ConfigError]:
    for key, tokens in (("service_tokens", config.server.service_tokens),
                        ("admin_tokens", config.server.admin_tokens)):
        for i, token in enumerate(tokens):
            try:
                resolve_tokens((token,), where.at("server").at(key).at(str(i)))
            except ConfigError as exc:
                yield exc


def _check_keys(config: Config, where: Where) -> Iterator[ConfigError]:
    if config.keys.pepper:
        pepper = resolve_secret(config.keys.pepper, where.at("keys.pepper"))
        if len(pepper.encode("utf-8", "surrogateescape")) < MIN_PEPPER_BYTES:
            yield where.at("keys.pepper").error(
                f"must be at least {MIN_PEPPER_BYTES} bytes (generate one with: "
                "openssl rand -hex 32)")


def _check_server(config: Config, where: Where) -> Iterator[ConfigError]:
    for i, listen in enumerate(config.server.listen):
        tcp = re.fullmatch(r"\[?[^\s\]]+\]?:(\d{1,5})", listen)
        if not listen.startswith("unix:") and (tcp is None or int(tcp.group(1)) > 65_535):
            yield where.at("server.listen").at(str(i)).error(
                f"{listen!r}: use host:port (port 0 to 65535) or unix:/path/to.sock")
    if not config.server.listen:
        yield where.at("server.listen").error("needs at least one address")
    for i, listen in enumerate(config.grpc.listen):
        tcp = re.fullmatch(r"\[?[^\s\]]+\]?:(\d{1,5})", listen)
        if tcp is None or int(tcp.group(1)) > 65_535:
            yield where.at("grpc.listen").at(str(i)).error(
                f"{listen!r}: use host:port (port 0 to 65535)")
    if config.server.max_body_bytes < 1024:
        yield where.at("server.max_body_bytes").error("must be at least 1024")
    for key in ("header_timeout_s", "body_timeout_s", "keepalive_timeout_s"):
        if not 0.1 <= getattr(config.server, key) <= 3600:
            yield where.at(f"server.{key}").error("must be between 0.1 and 3600 seconds")
    if not 1 <= config.server.max_connections <= 1_000_000:
        yield where.at("server.max_connections").error("must be between 1 and 1000000")
    if not 1 <= config.server.min_body_bytes_per_s <= 1_000_000_000:
        yield where.at("server.min_body_bytes_per_s").error(
            "must be between 1 and 1000000000")


def _check_encodings(config: Config, where: Where) -> Iterator[ConfigError]:
    # the daemon loads these at startup: a name that cannot load offline is a bad value here
    encodings = [(where.at("tokens.default_encoding"), config.tokens.default_encoding)]
    encodings += [(where.at("tokens.models").at(m), e) for m, e in config.tokens.models.items()]
    for at, encoding in encodings:
        try:
            check_encoding_name(encoding)
        except EncodingUnavailableError as exc:
            yield at.error(str(exc))


def _check_calendar(config: Config, where: Where) -> Iterator[ConfigError]:
    try:
        ZoneInfo(config.calendar.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        yield where.at("calendar.timezone").error(
            f"unknown timezone {config.calendar.timezone!r}")


def _check_reservations(config: Config, where: Where) -> Iterator[ConfigError]:
    if not 1 <= config.reservations.ttl_s <= MAX_RESERVATION_TTL_S:
        yield where.at("reservations.ttl_s").error(
            f"must be from 1 to {MAX_RESERVATION_TTL_S} seconds")
    if config.reservations.commit_grace_s > MAX_RESERVATION_TTL_S:
        yield where.at("reservations.commit_grace_s").error(
            f"must be at most {MAX_RESERVATION_TTL_S} seconds")


def _check_redis(config: Config, where: Where) -> Iterator[ConfigError]:
    url = config.redis.url
    if url and config.redis.mode != "sentinel" and not url.startswith(_URL_SCHEMES):
        yield where.at("redis.url").error(
            f"{url[:60]!r}: use redis://host:port, rediss://host:port (TLS) or "
            "unix:///path/to/redis.sock, or \"\" for the embedded Redis")
    if config.redis.timeout_ms < 1:
        yield where.at("redis.timeout_ms").error("must be at least 1 ms")
    if config.redis.mode == "cluster" and not config.redis.url:
        yield where.at("redis.url").error("cluster mode needs the url of a cluster node")
    if config.redis.mode == "sentinel" and not config.redis.url.startswith("redis+sentinel://"):
        yield where.at("redis.url").error(
            "sentinel mode needs redis+sentinel://host:port[,host:port]/service_name")
    yield from _check_replicas_ack(config.redis, where.at("redis.replicas_ack"))


def _check_abuse(config: Config, where: Where) -> Iterator[ConfigError]:
    if not 1 <= config.abuse.ipv4_prefix <= 32:
        yield where.at("abuse.ipv4_prefix").error("must be from 1 to 32")
    if not 1 <= config.abuse.ipv6_prefix <= 128:
        yield where.at("abuse.ipv6_prefix").error("must be from 1 to 128")
    if config.abuse.block_s < 1:
        yield where.at("abuse.block_s").error("must be at least 1 second")


def _check_anomaly(config: Config, where: Where) -> Iterator[ConfigError]:
    anomaly, where = config.anomaly, where.at("anomaly")
    if anomaly.action not in ANOMALY_ACTIONS:
        yield where.at("action").error(
            f"must be {' or '.join(ANOMALY_ACTIONS)}, not {anomaly.action!r}")
    if not 0 <= anomaly.min_history_hours <= MAX_HISTORY_HOURS:
        yield where.at("min_history_hours").error(
            f"must be from 0 to {MAX_HISTORY_HOURS} (active hours)")
    for key in ("request_spike_factor", "token_spike_factor"):
        if not 1 <= getattr(anomaly, key) <= 1000:
            yield where.at(key).error("must be from 1 to 1000 (times the baseline)")
    if not 1 <= anomaly.block_s <= MAX_ANOMALY_BLOCK_S:
        yield where.at("block_s").error(f"must be from 1 to {MAX_ANOMALY_BLOCK_S} seconds")
    for key in ("default_requests_per_hour", "default_tokens_per_request"):
        if not 1 <= getattr(anomaly, key) <= 10**9:
            yield where.at(key).error("must be a whole number from 1 to 10^9")


def _check_replicas_ack(redis: RedisConfig, where: Where) -> Iterator[ConfigError]:
    """A count of replicas to WAIT for; the embedded Redis has none, TLS is not pipelined."""
    if not 0 <= redis.replicas_ack <= 16:
        yield where.error("must be from 0 to 16 replicas")
    if redis.replicas_ack and not redis.url:
        yield where.error("the embedded Redis has no replicas: set [redis] url, or 0")
    if redis.replicas_ack and redis.url.startswith("rediss://"):
        yield where.error("is not supported over TLS (rediss://) yet: use 0")



def _check_alerts(config: Config, where: Where) -> Iterator[ConfigError]:
    """Thresholds are fractions; webhook URLs are http(s) with a host, each once; signing
    them needs a secret."""
    alerts, where = config.alerts, where.at("alerts")
    if any(not 0 < t <= 1 for t in alerts.thresholds):
        yield where.at("thresholds").error("each threshold is a fraction in (0, 1]")
    if len(alerts.thresholds) > MAX_ALERT_THRESHOLDS:
        # the Lua keeps a bit per threshold in a double
        yield where.at("thresholds").error(f"at most {MAX_ALERT_THRESHOLDS} thresholds")
    for i, url in enumerate(alerts.webhooks):
        if not _is_webhook_url(url):
            # the URL may carry a token: the message names its index, never its text
            yield where.at("webhooks").at(str(i)).error(
                "must be an http:// or https:// URL with a host")
        if url in alerts.webhooks[:i]:
            yield where.at("webhooks").at(str(i)).error("is listed twice")
    if alerts.webhooks and not alerts.webhook_secret:
        yield where.at("webhook_secret").error(
            "webhooks are signed: set a secret (env:NAME or credential:NAME)")
    for key in ("webhook_timeout_ms", "queue_size", "retry_max_s", "delivery_max_age_s",
                "stream_max_len", "claim_idle_ms"):
        if getattr(alerts, key) < 1:
            yield where.at(key).error("must be at least 1")


def _check_webhook_secret(config: Config, where: Where) -> Iterator[ConfigError]:
    if config.alerts.webhook_secret:
        at = where.at("alerts.webhook_secret")
        secret = resolve_secret(config.alerts.webhook_secret, at)
        if len(secret.encode("utf-8", "surrogateescape")) < MIN_TOKEN_BYTES:
            yield at.error(f"must be at least {MIN_TOKEN_BYTES} bytes")


def _is_webhook_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        _ = parts.port  # a port out of range raises here
    except ValueError:
        return False
    return (parts.scheme in ("http", "https") and bool(parts.hostname)
            and not any(c.isspace() for c in url))


def _check_attributes(config: Config, where: Where) -> Iterator[ConfigError]:
    for i, name in enumerate(config.attributes.names):
        if not _ATTRIBUTE_NAME.fullmatch(name) or name == "ip":
            yield where.at("attributes.names").at(str(i)).error(
                f"{name!r}: an attribute name is lowercase letters, digits and '_' (ip is "
                "built in)")


# the checks that span keys: each yields every mistake it finds
_CHECKS: Final = (_check_server, _check_encodings, _check_calendar, _check_reservations,
                  _check_redis, _check_abuse, _check_anomaly, _check_alerts, _check_attributes)
# the checks that read secrets (environment, credential files)
_SECRET_CHECKS: Final = (_check_tokens, _check_keys, _check_webhook_secret)


def resolve_secret(value: str, where: Where | None = None) -> str:
    """One configured secret (credentials.py reads the references), or the ConfigError
    that names its key."""
    try:
        return credentials.resolve_secret(value)
    except credentials.CredentialError as exc:
        raise (where or Where("<config>")).error(str(exc)) from None


def resolve_tokens(values: tuple[str, ...], where: Where | None = None) -> tuple[bytes, ...]:
    """A configured token list as the edge compares it: every reference resolved, each token
    at least MIN_TOKEN_BYTES; or the ConfigError that names its key."""
    try:
        tokens = credentials.resolve_tokens(values)
    except credentials.CredentialError as exc:
        raise (where or Where("<config>")).error(str(exc)) from None
    return tuple(t.encode("utf-8", "surrogateescape") for t in tokens)
