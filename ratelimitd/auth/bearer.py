"""Admin tokens: every /v1/admin/* route needs one, configured or not.

The edge (edge.py) calls `check_admin_token` for each /v1/admin/* request instead of the
service-token check, so a route added under /v1/admin/ (admin.py, usage.py...) cannot forget
it. No token: 401 missing_credentials; a service token: 403 admin_token_required (it is known,
and not enough); any other token: 401 invalid_admin_token. With no admin token configured
every call is refused the same way, and the message says how to configure one. Tokens are
compared in constant time, with every configured token, so timing does not tell which matched.
"""

from __future__ import annotations

import hmac
from typing import Final

from aiohttp import web

from ratelimitd.errors import ApiError

ADMIN_PREFIX: Final = "/v1/admin/"
_CHALLENGE: Final = 'Bearer realm="ratelimitd-admin"'
_CONFIGURE: Final = ("; this daemon has no admin token: set [server] admin_tokens "
                     "(\"env:NAME\" or \"credential:NAME\") and reload (SIGHUP) or restart it")


def is_admin_path(path: str) -> bool:
    return path.startswith(ADMIN_PREFIX) or path == ADMIN_PREFIX.rstrip("/")


def _matches(candidate: bytes, tokens: tuple[bytes, ...]) -> bool:
    matched = False
    for token in tokens:  # no early exit
        matched |= hmac.compare_digest(candidate, token)
    return matched


def check_admin_token(request: web.Request, service_tokens: tuple[bytes, ...],
                      admin_tokens: tuple[bytes, ...]) -> None:
    hint = "" if admin_tokens else _CONFIGURE
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise ApiError(401, "missing_credentials",
                       f"send an admin token as Authorization: Bearer <token>{hint}",
                       {"WWW-Authenticate": _CHALLENGE})
    # aiohttp decodes a header as UTF-8 with surrogateescape: a byte that is not UTF-8 comes
    # back as it was sent (and matches no token) instead of failing
    candidate = presented.strip().encode("utf-8", "surrogateescape")
    if _matches(candidate, admin_tokens):
        return
    if _matches(candidate, service_tokens):
        raise ApiError(403, "admin_token_required",
                       f"this is a service token; /v1/admin/* needs an admin token{hint}")
    raise ApiError(401, "invalid_admin_token", f"the admin token is not valid{hint}",
                   {"WWW-Authenticate": f'{_CHALLENGE}, error="invalid_token"'})
