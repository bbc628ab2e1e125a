"""The configuration's shape: one frozen dataclass per TOML section, every key defaulted.

The reader (reader.py) reads each section field by field from these type hints, so adding a
key here is all it takes to make it configurable (and checked).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from ratelimitd.config.envoy_rules import EnvoyRules
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
    # connection deadlines and cap (http/server.py): a slow or silent client is closed
    header_timeout_s: float = 10.0          # request line and headers complete
    body_timeout_s: float = 30.0            # the whole body, from the end of the head
    keepalive_timeout_s: float = 30.0       # idle between requests
    max_connections: int = 4096             # beyond it the idlest connection is closed
    min_body_bytes_per_s: float = 500.0     # a slower body is the first closed when full
    access_log: bool = True                 # one JSON line per answer on stderr
    # every limit is evaluated, counted and reported but never denies (rolling out limits)
    shadow_mode: bool = False


@dataclass(frozen=True, slots=True)
class RedisConfig:
    url: str = ""
    data_dir: str = ""
    mode: str = "standalone"
    timeout_ms: int = 100
    on_error: str = "deny"
    # replicas each settle waits for (WAIT) before it answers; 0: async replication, a failover
    # may lose the last writes (store/replication.py)
    replicas_ack: int = 0


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
    # an image part without width and height; 0: the most one can cost (tokenize/chat.py)
    image_tokens: int = 0


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


# The key pepper's least length ([keys] pepper, RATELIMITD_KEY_PEPPER, credential key_pepper)
MIN_PEPPER_BYTES: Final = 32


@dataclass(frozen=True, slots=True)
class KeysConfig:
    # a secret reference ("env:NAME", "credential:NAME"); "" reads $RATELIMITD_KEY_PEPPER,
    # else the credential key_pepper when it exists, else no pepper (key features off)
    pepper: str = ""
    max_age_days: int = 90
    warn_days: int = 14
    rotation_grace_s: int = 86_400
    # POST /v1/admin/keys with attributes.ip: keys made per ip_prefix network per hour (mass
    # key creation is the multi-account pattern); 0 = no limit
    creations_per_ip_prefix_per_hour: int = 20


@dataclass(frozen=True, slots=True)
class AbuseConfig:
    auth_failures_per_ip: int = 20
    block_s: int = 900
    signature_max_age_s: int = 300
    # the ip_prefix scope's networks, and IPv6 auth-failure counting (abuse/ip.py)
    ipv4_prefix: int = 24
    ipv6_prefix: int = 64


@dataclass(frozen=True, slots=True)
class AnomalyConfig:
    # what a request spike does: "alert", or "block" the subject for block_s too (a tier may
    # choose its own: `[tiers.X] anomaly = "block"`)
    action: str = "alert"
    # no spike decision for a subject with fewer active hours of baseline than this
    min_history_hours: int = 24
    request_spike_factor: float = 5.0
    token_spike_factor: float = 3.0
    block_s: int = 900
    # the baselines of a subject without history (lua/anomaly.lua)
    default_requests_per_hour: int = 10
    default_tokens_per_request: int = 500


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
    # an alert a stopped daemon was delivering is taken over by another after this long
    # (at least twice webhook_timeout_ms)
    claim_idle_ms: int = 60_000


@dataclass(frozen=True, slots=True)
class AttributesConfig:
    # request attribute names (besides ip) that limits may use as their scope
    names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GrpcConfig:
    # Envoy's rate limit service (envoy/service.py); none: no gRPC listener
    listen: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EnvoyConfig:
    # envoyproxy/ratelimit YAML files (glob patterns, relative to this file's directory)
    config: tuple[str, ...] = ()
    # add RateLimit-Limit / -Remaining / -Reset to the answers (response_headers_to_add)
    response_headers: bool = False
    # the descriptor entry key whose value names one call of Envoy's (Envoy's retries of it
    # carry the same): a retried call is charged once; it takes no part in matching rules
    request_id_key: str = "x-request-id"


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
    attributes: AttributesConfig = AttributesConfig()
    grpc: GrpcConfig = GrpcConfig()
    envoy: EnvoyConfig = EnvoyConfig()
    # the rules [envoy] config loads (config/envoy_rules.py)
    envoy_rules: EnvoyRules = field(default_factory=EnvoyRules)
    source: str = "<defaults>"
