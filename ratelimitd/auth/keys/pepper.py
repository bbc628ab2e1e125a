"""The server-side pepper: the HMAC key under which Redis stores every API key.

Read from `[keys] pepper` when set (a secret reference: "env:NAME" or "credential:NAME",
resolved by config/credentials.py), else from the environment variable RATELIMITD_KEY_PEPPER,
else from the systemd credential key_pepper when it exists. Redis never holds a key, only
HMAC-SHA256(pepper, key), so a copy of Redis (a backup, a replica, a MONITOR) cannot be
replayed as keys, and without the pepper the hashes cannot be brute-forced offline either. Key
ids and signing secrets are derived from the pepper too (domain-separated HMACs), so they need
no storage of their own.

No pepper is not an error here: with no `[keys] pepper`, `load_pepper` answers None and key
features stay off, while the rest of the daemon works (a KeyStore cannot be built without a
Pepper).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from typing import Final

from ratelimitd.auth.keys.format import base62
from ratelimitd.config import MIN_PEPPER_BYTES
from ratelimitd.config.credentials import (
    CREDENTIAL_PREFIX,
    CredentialError,
    credential_path,
    resolve_secret,
)
from ratelimitd.errors import RatelimitdError

PEPPER_ENV: Final = "RATELIMITD_KEY_PEPPER"
PEPPER_CREDENTIAL: Final = "key_pepper"
KEY_ID_PREFIX: Final = "key_"
KEY_ID_CHARS: Final = 17            # 96 bits in base62
SIGNING_SECRET_PREFIX: Final = "rls_"  # noqa: S105 - a prefix, not a secret


class PepperError(RatelimitdError, ValueError):
    """The pepper is configured but unusable (too short, unreadable)."""


class Pepper:
    """The pepper and what is derived from it. Its repr never shows it."""

    __slots__ = ("_mac",)

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_PEPPER_BYTES:
            raise PepperError(f"the key pepper must be at least {MIN_PEPPER_BYTES} bytes "
                              f"(generate one with: openssl rand -hex 32)")
        # keyed once; each use copies it (saves re-keying on the hot path)
        self._mac = hmac.new(secret, digestmod=hashlib.sha256)

    def __repr__(self) -> str:
        return "Pepper(<hidden>)"

    def _hmac(self, *parts: bytes) -> bytes:
        mac = self._mac.copy()
        mac.update(b"\0".join(parts))
        return mac.digest()

    def key_hash(self, api_key: str) -> str:
        """HMAC-SHA256(pepper, key) in hex: all Redis learns of a key."""
        mac = self._mac.copy()
        mac.update(api_key.encode())
        return mac.hexdigest()

    def key_id(self, api_key: str) -> str:
        """The key's id: a 96-bit HMAC of the key under its own label, so a resolve finds the
        key's record (and its Redis slot) in one lookup. Without the pepper it says nothing
        about the key."""
        number = int.from_bytes(self._hmac(b"key-id", api_key.encode())[:12], "big")
        return KEY_ID_PREFIX + base62(number, KEY_ID_CHARS)

    def signing_secret(self, key_id: str, seed: str) -> str:
        """The key's signing secret: derived, so Redis keeps only the random seed."""
        return SIGNING_SECRET_PREFIX + self._hmac(b"sign", key_id.encode(), seed.encode()).hex()



def load_pepper(reference: str = "", *, environ: Mapping[str, str] | None = None
                ) -> Pepper | None:
    """The configured pepper: `reference` ([keys] pepper) when set, which must resolve; else
    $RATELIMITD_KEY_PEPPER, else the credential key_pepper when it exists; else None."""
    env = os.environ if environ is None else environ
    if not reference:
        if env.get(PEPPER_ENV):
            reference = f"env:{PEPPER_ENV}"
        elif env.get("CREDENTIALS_DIRECTORY") and credential_path(PEPPER_CREDENTIAL,
                                                                   env).exists():
            reference = CREDENTIAL_PREFIX + PEPPER_CREDENTIAL
        else:
            return None
    try:
        secret = resolve_secret(reference, env)
    except CredentialError as exc:
        raise PepperError(str(exc)) from None
    return Pepper(secret.encode("utf-8", "surrogateescape"))


class KeysUnavailableError(RatelimitdError, RuntimeError):
    """A key feature was used on a daemon that has no pepper (suggested answer: 503
    keys_unavailable); everything that needs no key still works."""

    def __init__(self) -> None:
        super().__init__(
            f"API keys are not available: this daemon has no key pepper; set [keys] pepper "
            f"(\"credential:NAME\" or \"env:NAME\"), {PEPPER_ENV} or the systemd credential "
            f"{PEPPER_CREDENTIAL} (at least {MIN_PEPPER_BYTES} bytes, e.g. `openssl rand -hex "
            f"32`), the same on every daemon")


def require_pepper(reference: str = "", *, environ: Mapping[str, str] | None = None
                   ) -> Pepper:
    """The configured pepper, or KeysUnavailableError."""
    pepper = load_pepper(reference, environ=environ)
    if pepper is None:
        raise KeysUnavailableError
    return pepper
