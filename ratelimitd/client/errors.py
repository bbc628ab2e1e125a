"""The API's error answers as exceptions, so a gateway catches what it can act on.

This tree is separate from the daemon's (ratelimitd/errors.py) on purpose: a gateway imports
the client without any of the daemon's modules (a test checks it), so the client's root is its
own RatelimitdError.

    RatelimitdError                 any failure; .status, .code, .message, .headers
    ├── RateLimited                 429: denied by a limit; .retry_after (s), .reason, .limits
    ├── InvalidRequest              400 / 413: the request is wrong; retrying will not help
    ├── AuthError                   401, 403 key_revoked / key_expired: credentials refused
    ├── Blocked                     403 blocked: the caller (user, ip...) is blocked for a while
    ├── ReservationNotFound         404: unknown or expired reservation
    ├── ReservationConflict         409: commit of a released one, or release of a committed one
    ├── Unavailable                 no decision could be had (after the client's retries)
    │   ├── BackendUnavailable      503: the daemon's Redis did not answer
    │   └── DaemonUnreachable       no answer from the daemon: refused, timed out, a proxy's 502
    └── ServerError                 500 or an answer this client does not understand
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from ratelimitd.client.results import LimitStatus


class RatelimitdError(Exception):
    """A ratelimitd call failed. status is the HTTP status (0: no answer at all), code the
    API's snake_case error code, headers the answer's headers (Retry-After, x-ratelimit-*)."""

    def __init__(self, message: str, *, status: int = 0, code: str = "",
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.headers: Mapping[str, str] = dict(headers or {})

    def __str__(self) -> str:
        where = f"{self.status} {self.code}" if self.status else self.code
        return f"{where}: {self.message}" if where else self.message


class RateLimited(RatelimitdError):
    """A reserve was denied (429). reason names the limit; retry_after_ms says when the call
    would fit, or is None when it never will (it asks more than the limit allows at all)."""

    def __init__(self, message: str, *, reason: str, retry_after_ms: int | None,
                 limits: tuple[LimitStatus, ...] = (), status: int = 429,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message, status=status, code="rate_limited", headers=headers)
        self.reason = reason
        self.retry_after_ms = retry_after_ms
        self.limits = limits

    @property
    def retry_after(self) -> float | None:
        """Seconds to wait before the call fits, or None if it never will."""
        return None if self.retry_after_ms is None else self.retry_after_ms / 1000

    @property
    def retry_after_s(self) -> int | None:
        """Whole seconds, rounded up, as the Retry-After header gives them."""
        return None if self.retry_after_ms is None else math.ceil(self.retry_after_ms / 1000)

    @property
    def denied_limit(self) -> LimitStatus | None:
        """The limit that denied the call, when the answer lists it."""
        return next((lim for lim in self.limits if lim.name == self.reason), None)


class InvalidRequest(RatelimitdError):
    """400 (empty_prompt, prompt_too_long, too_many_input_tokens, unknown_model,
    exceeds_limit: a call no limit will ever fit, invalid_request) or 413 body_too_large."""


class AuthError(RatelimitdError):
    """401 (invalid_api_key, missing_credentials, invalid_signature, invalid_service_token) or
    403 key_revoked / key_expired."""


class Blocked(RatelimitdError):
    """403 blocked: the subject is blocked (abuse defence or an operator's block)."""


class ReservationNotFound(RatelimitdError):
    """404 reservation_not_found: unknown, or expired before it was settled."""


class ReservationConflict(RatelimitdError):
    """409: the reservation was settled the other way (released, or committed)."""


class Unavailable(RatelimitdError):
    """No decision: the daemon or its Redis did not answer, after the client's retries."""


class BackendUnavailable(Unavailable):
    """503 backend_unavailable: the daemon's Redis did not answer in time."""


class DaemonUnreachable(Unavailable):
    """The daemon did not answer: connection refused or reset, or the client's timeout."""


class ServerError(RatelimitdError):
    """500, or an answer that is not what the API promises."""


_BY_CODE: Final[dict[str, type[RatelimitdError]]] = {
    "blocked": Blocked,
    "reservation_not_found": ReservationNotFound,
    "backend_unavailable": BackendUnavailable,
    "key_revoked": AuthError,
    "key_expired": AuthError,
}
_BY_STATUS: Final[dict[int, type[RatelimitdError]]] = {
    400: InvalidRequest, 413: InvalidRequest, 422: InvalidRequest,
    401: AuthError, 403: AuthError, 409: ReservationConflict, 503: BackendUnavailable,
    502: DaemonUnreachable, 504: DaemonUnreachable,  # from a proxy in front of the daemons
}


def error_from_answer(status: int, data: Any, headers: Mapping[str, str]) -> RatelimitdError:
    """The exception for a non-2xx answer that is not a reserve's denial."""
    code, message = f"http_{status}", f"HTTP {status}"
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code") or code)
        message = str(error.get("message") or message)
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else RatelimitdError
    return cls(message, status=status, code=code, headers=headers)
