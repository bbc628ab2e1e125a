"""The key store's errors: each names what an admin call answers (400, 404 or 409)."""

from __future__ import annotations

from ratelimitd.errors import RatelimitdError


class KeyInputError(RatelimitdError, ValueError):
    """A bad argument to an admin operation; `field` names it (answer 400)."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name
        self.problem = problem


class KeyNotFoundError(RatelimitdError, LookupError):
    """No key has this id (answer 404 key_not_found)."""

    def __init__(self, key_id: str) -> None:
        super().__init__(f"no API key has the id {key_id!r}")
        self.key_id = key_id


class KeyStateError(RatelimitdError):
    """The key cannot be rotated in its state (answer 409 with `code`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
