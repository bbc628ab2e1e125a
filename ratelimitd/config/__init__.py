"""Configuration: the TOML file of the daemon, every key defaulted, every mistake named.

model.py holds the shape (one dataclass per section), reader.py the generic field-by-field
reading, tiers.py the tier, limit and price tables, loader.py `load_config` / `parse_config`
and the checks that span keys.
"""

from ratelimitd.config.loader import load_config, parse_config, resolve_secret, resolve_tokens
from ratelimitd.config.model import (
    MIN_PEPPER_BYTES,
    AbuseConfig,
    AlertsConfig,
    AnomalyConfig,
    CalendarConfig,
    Config,
    KeysConfig,
    PricingConfig,
    RedisConfig,
    ReservationsConfig,
    ServerConfig,
    TokensConfig,
)
from ratelimitd.errors import ConfigError

__all__ = [
    "MIN_PEPPER_BYTES",
    "AbuseConfig",
    "AlertsConfig",
    "AnomalyConfig",
    "CalendarConfig",
    "Config",
    "ConfigError",
    "KeysConfig",
    "PricingConfig",
    "RedisConfig",
    "ReservationsConfig",
    "ServerConfig",
    "TokensConfig",
    "load_config",
    "parse_config",
    "resolve_secret",
    "resolve_tokens",
]
