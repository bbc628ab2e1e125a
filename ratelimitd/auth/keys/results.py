"""What the key store answers: a resolve's key or failure, and the admin calls' results."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from ratelimitd.config import KeysConfig
from ratelimitd.policy import Identity

FailureReason = Literal["malformed", "unknown", "revoked", "expired"]
KeyState = Literal["active", "rotated", "expired", "revoked"]


@dataclass(frozen=True, slots=True)
class KeyFailure:
    """Why a resolve refused a key. `status`/`code` follow docs/errors.md: malformed and
    unknown keys are the same 401 with the same message (no oracle); revoked and expired are
    403."""

    reason: FailureReason

    @property
    def status(self) -> int:
        return 401 if self.reason in ("malformed", "unknown") else 403

    @property
    def code(self) -> str:
        return {"malformed": "invalid_api_key", "unknown": "invalid_api_key",
                "revoked": "key_revoked", "expired": "key_expired"}[self.reason]

    @property
    def message(self) -> str:
        return {
            "malformed": _INVALID_MESSAGE, "unknown": _INVALID_MESSAGE,
            "revoked": "api_key: this key was revoked; ask for a new one",
            "expired": "api_key: this key has expired; ask for a new one (or rotate it)",
        }[self.reason]


_INVALID_MESSAGE: Final = ("api_key: not a valid API key; check it was copied whole "
                           "(rlk_ and 36 letters or digits), or ask for a new one")


@dataclass(frozen=True, slots=True)
class KeyWarning:
    code: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True, slots=True)
class ResolvedKey:
    """Who a valid key speaks for, and what to tell its caller."""

    key_id: str
    user: str
    tier: str
    org: str | None
    created_at_ms: int
    expires_at_ms: int | None        # effective: the key's own expiry or max_age_days
    warn_from_ms: int | None         # from then on, a key_expiring warning rides along
    require_signature: bool
    rotated_to: str | None
    warnings: tuple[KeyWarning, ...]
    signing_secret: str | None = field(default=None, repr=False)

    def identity(self, attributes: Mapping[str, str] | None = None) -> Identity:
        return Identity(self.user, self.tier, self.org, self.key_id, dict(attributes or {}))


@dataclass(frozen=True, slots=True)
class CreatedKey:
    key_id: str
    api_key: str = field(repr=False)
    expires_at_ms: int | None
    signing_secret: str | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The 201 answer of POST /v1/admin/keys (the only time the key is shown)."""
        return _key_answer(self.signing_secret, key_id=self.key_id, api_key=self.api_key,
                           expires_at_ms=self.expires_at_ms)


@dataclass(frozen=True, slots=True)
class RotatedKey:
    key_id: str
    api_key: str = field(repr=False)
    expires_at_ms: int | None
    old_key_id: str
    old_key_expires_at_ms: int
    signing_secret: str | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The 201 answer of POST /v1/admin/keys/{key_id}/rotate. A key that requires
        signatures gets a new signing secret too (the old one works with the old key only)."""
        return _key_answer(self.signing_secret, key_id=self.key_id, api_key=self.api_key,
                           expires_at_ms=self.expires_at_ms, old_key_id=self.old_key_id,
                           old_key_expires_at_ms=self.old_key_expires_at_ms)


def _key_answer(signing_secret: str | None, **fields: Any) -> dict[str, Any]:
    """A new key's answer: its fields, and its signing secret when it has one."""
    if signing_secret is not None:
        fields["signing_secret"] = signing_secret
    return fields


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A key's metadata, as `show` answers it: never the key, its hash or a secret."""

    key_id: str
    user: str
    org: str | None
    tier: str
    state: KeyState
    created_at_ms: int
    expires_at_ms: int | None
    revoked_at_ms: int | None
    rotated_to: str | None
    rotated_from: str | None
    require_signature: bool

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "user": self.user, "org": self.org, "tier": self.tier,
                "state": self.state, "created_at_ms": self.created_at_ms,
                "expires_at_ms": self.expires_at_ms, "revoked_at_ms": self.revoked_at_ms,
                "rotated_to": self.rotated_to, "rotated_from": self.rotated_from,
                "require_signature": self.require_signature}


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """The `[keys]` section. max_age_days 0: keys have no maximum age; warn_days 0: no
    warning."""

    max_age_days: int = 90
    warn_days: int = 14
    rotation_grace_s: int = 86_400

    @classmethod
    def from_config(cls, config: KeysConfig) -> KeyPolicy:
        return cls(config.max_age_days, config.warn_days, config.rotation_grace_s)
