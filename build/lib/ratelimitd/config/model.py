"""The configuration's shape: one frozen dataclass per TOML section, every key defaulted.

The reader (reader.py) reads each section field by field from these type hints, so adding a
key here is all it takes to make it configurable (and checked).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ratelimitd.policy import (
    DEFAULT_MODEL_PRICE,
    DEFAULT_PRICES,
    ModelPrice,
    PriceTable,
    Tier,
    default_tiers,
)


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
    # an uncommitted reservation's record is kept this long past its expiry, so a late
    # commit still charges what the call really used
    commit_grace_s: int = 3600
    min_output_tokens: int = 16
    # output cap reserved when neither the request nor the tier names one
    default_max_output_tokens: int = 4096


@dataclass(frozen=True, slots=True)
class TokensConfig:
    default_encoding: str = "o200k_base"
    models: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PricingConfig:
    unknown_model: str = "default"
    default: ModelPrice = DEFAULT_MODEL_PRICE
    models: Mapping[str, ModelPrice] = field(default_factory=lambda: dict(DEFAULT_PRICES))

    def table(self) -> PriceTable:
        return PriceTable.build(self.models,
                                self.default if self.unknown_model == "default" else None)


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
