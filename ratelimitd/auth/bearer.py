"""Bearer tokens: service tokens on /v1/*, admin tokens on /v1/admin/*.

The edge (http/edge.py) asks for an admin token on every /v1/admin/* request instead of the
service token, so a route added under /v1/admin/ (admin.py, usage.py...) cannot forget it.
Service tokens, when configured, guard the rest of /v1/: no token is 401 missing_credentials,
another token 401 invalid_service_token. Admin tokens are asked for configured or not: no token
401 missing_credentials; a service token 403 admin_token_required (it is known, and not
enough); any other token 401 invalid_admin_token. With no admin token configured every call is
refused the same way, and the message says how to configure one.

Every token is compared in constant time with every configured token (`matches_any`), so
timing does not tell which matched, or how much of one.
"""

from __future__ import annotations

import hmac
from typing import Final

from ratelimitd.errors import ApiError

ADMIN_PREFIX: Final = "/v1/admin/"
_SERVICE_CHALLENGE: Final = 'Bearer realm="ratelimitd"'
_ADMIN_CHALLENGE: Final = 'Bearer realm="ratelimitd-admin"'
_CONFIGURE: Final = ("; this daemon has no admin token: set [server] admin_tokens "
                     "(\"env:NAME\" or \"credential:NAME\") and reload (SIGHUP) or restart it")


def is_admin_path(path: str) -> bool:
    return path.startswith(ADMIN_PREFIX) or path == ADMIN_PREFIX.rstrip("/")


def presented_token(authorization: str) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header, None without one.

    A header is bytes: aiohttp decodes it as UTF-8 with surrogateescape, so a byte that is not
    UTF-8 comes back as it was sent (and matches no token) instead of failing."""
    scheme, _, presented = authorization.partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        return None
    return presented.encode("utf-8", "surrogateescape")


def matches_any(candidate: bytes, tokens: tuple[bytes, ...]) -> bool:
    """Whether `candidate` is one of `tokens`, in time that does not depend on which."""
    matched = False
    for token in tokens:  # no early exit
        matched |= hmac.compare_digest(candidate, token)
    return matched


def check_service_token(authorization: str, service_tokens: tuple[bytes, ...]) -> None:
    """Raise the 401 for a request to /v1/* (not admin) whose token is missing or unknown."""
    candidate = presented_token(authorization)
    if candidate is None:
        raise ApiError(401, "missing_credentials",
                       "send the service token as Authorization: Bearer <token>",
                       {"WWW-Authenticate": _SERVICE_CHALLENGE})
    if not matches_any(candidate, service_tokens):
        raise ApiError(401, "invalid_service_token", "the service token is not valid",
                       {"WWW-Authenticate": f'{_SERVICE_CHALLENGE}, error="invalid_token"'})


def check_admin_token(authorization: str, service_tokens: tuple[bytes, ...],
                      admin_tokens: tuple[bytes, ...]) -> None:
    """Raise the 401 or 403 for a request to /v1/admin/* without a valid admin token."""
    hint = "" if admin_tokens else _CONFIGURE
    candidate = presented_token(authorization)
    if candidate is None:
        raise ApiError(401, "missing_credentials",
                       f"send an admin token as Authorization: Bearer <token>{hint}",
                       {"WWW-Authenticate": _ADMIN_CHALLENGE})
    if matches_any(candidate, admin_tokens):
        return
    if matches_any(candidate, service_tokens):
        raise ApiError(403, "admin_token_required",
                       f"this is a service token; /v1/admin/* needs an admin token{hint}")
    raise ApiError(401, "invalid_admin_token", f"the admin token is not valid{hint}",
                   {"WWW-Authenticate": f'{_ADMIN_CHALLENGE}, error="invalid_token"'})
