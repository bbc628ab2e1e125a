"""API keys: the `rlk_` format (format), the pepper (pepper), the Redis store (store: its
record, record; its answers, results; its errors, errors) with its per-process resolve cache
(cache) and the invalidations that keep every daemon's cache true (invalidation). See store.py
for the Redis layout."""

from ratelimitd.auth.keys.errors import KeyInputError, KeyNotFoundError, KeyStateError
from ratelimitd.auth.keys.format import KEY_PATTERN, generate_api_key, well_formed
from ratelimitd.auth.keys.invalidation import INVALIDATE_CHANNEL
from ratelimitd.auth.keys.pepper import (
    KeysUnavailableError,
    Pepper,
    PepperError,
    load_pepper,
    require_pepper,
)
from ratelimitd.auth.keys.results import (
    CreatedKey,
    KeyFailure,
    KeyInfo,
    KeyPolicy,
    KeyWarning,
    ResolvedKey,
    RotatedKey,
)
from ratelimitd.auth.keys.store import KeyStore

__all__ = [
    "INVALIDATE_CHANNEL", "KEY_PATTERN", "CreatedKey", "KeyFailure", "KeyInfo", "KeyInputError",
    "KeyNotFoundError", "KeyPolicy", "KeyStateError", "KeyStore", "KeyWarning",
    "KeysUnavailableError", "Pepper", "PepperError", "ResolvedKey", "RotatedKey",
    "generate_api_key", "load_pepper", "require_pepper", "well_formed",
]
