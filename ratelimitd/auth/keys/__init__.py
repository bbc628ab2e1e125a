"""API keys: the `rlk_` format (format), the pepper (pepper), the Redis store with its
per-process resolve cache (store, cache). See store.py for the Redis layout."""

from ratelimitd.auth.keys.format import KEY_PATTERN, generate_api_key, well_formed
from ratelimitd.auth.keys.pepper import (
    KeysUnavailableError,
    Pepper,
    PepperError,
    load_pepper,
    require_pepper,
)
from ratelimitd.auth.keys.store import (
    INVALIDATE_CHANNEL,
    CreatedKey,
    KeyFailure,
    KeyInfo,
    KeyInputError,
    KeyNotFoundError,
    KeyPolicy,
    KeyStateError,
    KeyStore,
    KeyWarning,
    ResolvedKey,
    RotatedKey,
)

__all__ = [
    "INVALIDATE_CHANNEL", "KEY_PATTERN", "CreatedKey", "KeyFailure", "KeyInfo", "KeyInputError",
    "KeyNotFoundError", "KeyPolicy", "KeyStateError", "KeyStore", "KeyWarning",
    "KeysUnavailableError", "Pepper", "PepperError", "ResolvedKey", "RotatedKey",
    "generate_api_key", "load_pepper", "require_pepper", "well_formed",
]
