"""Every error /openapi.json documents for an admin route is one the daemon answers there, and
every error the daemon answers there is documented (in the spec for that route and status, and
in docs/errors.md): each is driven over real HTTP against a real Redis."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.http.test_openapi import SPEC, check_answer
from tests.support.http import Serve, call
from tests.support.keys import ADMIN, SERVICE, Client, admin, keys_config, new_key

ERRORS_MD = (Path(__file__).resolve().parents[2] / "docs" / "errors.md").read_text()
# answered by every route alike and driven where they are built (Redis down: tests/store and
# tests/http/test_errors.py); a key past its expiry needs a clock (tests/keys)
NOT_DRIVEN_HERE = {(503, "backend_unavailable"), (409, "key_expired")}
NO_AUTH: dict[str, str] = {}
WRONG = {"Authorization": "Bearer not-an-admin-token"}
AUTH_CASES = ((NO_AUTH, 401, "missing_credentials"), (WRONG, 401, "invalid_admin_token"),
              (SERVICE, 403, "admin_token_required"))
KEY = "/v1/admin/keys/{key_id}"


def documented() -> set[tuple[str, str, int, str]]:
    found = set()
    for path, ops in SPEC["paths"].items():
        if not path.startswith("/v1/admin/"):
            continue
        for method, op in ops.items():
            for status, answer in op["responses"].items():
                if int(status) >= 400:
                    codes = answer["description"].removeprefix("error; codes: ")
                    found |= {(method.upper(), path, int(status), c) for c in codes.split(", ")}
    return found


class Driver:
    """Sends admin calls and records which (route, status, code) each answered."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.seen: set[tuple[str, str, int, str]] = set()

    async def expect(self, method: str, path: str, body: Any, status: int, code: str,
                     headers: dict[str, str] = ADMIN, raw: bytes | None = None) -> None:
        if raw is not None:
            resp = await self.client.request(method, path, data=raw, headers={
                **headers, "Content-Type": "application/json"})
            answer = await resp.json()
        else:
            resp, answer = await call(self.client, path, body, method=method, headers=headers)
        template = re.sub(r"/v1/admin/keys/[^/?]+", KEY, path.split("?")[0])
        assert (resp.status, answer.get("error", {}).get("code")) == (status, code), \
            (method, path, answer)
        check_answer(method, template, resp.status, answer)
        assert f"`{code}`" in ERRORS_MD, code
        self.seen.add((method, template, status, code))


async def test_every_documented_admin_error_is_answered_and_every_answer_documented(
        serve: Serve, monkeypatch: pytest.MonkeyPatch) -> None:
    config = keys_config(server={"max_body_bytes": 1024},
                         keys={"creations_per_ip_prefix_per_hour": 1})
    monkeypatch.setenv("RATELIMITD_KEY_PEPPER", "p" * 64)
    drive = Driver(await serve(config))
    rotated = await new_key(drive.client)
    await admin(drive.client, "POST", f"/v1/admin/keys/{rotated['key_id']}/rotate")
    revoked = await new_key(drive.client)
    await admin(drive.client, "POST", f"/v1/admin/keys/{revoked['key_id']}/revoke")
    await admin(drive.client, "POST", "/v1/admin/blocks", {
        "scope": "ip_prefix", "id": "198.51.100.0/24", "ttl_s": 600, "reason": "abuse"})
    missing = "/v1/admin/keys/key_" + "A" * 17
    big = b'{"user": "' + b"u" * 2000 + b'", "tier": "t"}'
    routes: list[tuple[str, str, Any]] = [
        ("POST", "/v1/admin/keys", {"user": "u1", "tier": "t"}),
        ("POST", f"{missing}/rotate", None), ("POST", f"{missing}/revoke", None),
        ("GET", missing, None),
        ("POST", "/v1/admin/blocks", {"scope": "user", "id": "u", "ttl_s": 9, "reason": "r"}),
        ("DELETE", "/v1/admin/blocks?scope=user&id=u", None), ("GET", "/v1/admin/blocks", None),
        ("GET", "/v1/admin/usage?scope=user&id=u", None)]
    for method, path, body in routes:
        for headers, status, code in AUTH_CASES:
            await drive.expect(method, path, body, status, code, headers)

    await drive.expect("POST", "/v1/admin/keys", {"user": "u1"}, 400, "invalid_request")
    await drive.expect("POST", "/v1/admin/keys", None, 413, "body_too_large", raw=big)
    ip = {"user": "u2", "tier": "t", "attributes": {"ip": "203.0.113.5"}}
    await admin(drive.client, "POST", "/v1/admin/keys", ip)
    await drive.expect("POST", "/v1/admin/keys", ip, 429, "too_many_key_creations")
    await drive.expect("POST", "/v1/admin/keys", {**ip, "attributes": {"ip": "198.51.100.7"}},
                       403, "blocked")
    await drive.expect("POST", f"{missing}/rotate", {"grace_s": -1}, 400, "invalid_request")
    await drive.expect("POST", f"{missing}/rotate", None, 404, "key_not_found")
    await drive.expect("POST", f"/v1/admin/keys/{revoked['key_id']}/rotate", None, 409,
                       "key_revoked")
    await drive.expect("POST", f"/v1/admin/keys/{rotated['key_id']}/rotate", None, 409,
                       "key_rotated")
    await drive.expect("POST", f"{missing}/revoke", {"why": "x"}, 400, "invalid_request")
    await drive.expect("POST", f"{missing}/revoke", None, 404, "key_not_found")
    await drive.expect("GET", missing, None, 404, "key_not_found")
    await drive.expect("POST", "/v1/admin/blocks", {"scope": "user"}, 400, "invalid_request")
    await drive.expect("POST", "/v1/admin/blocks", None, 413, "body_too_large", raw=big)
    await drive.expect("DELETE", "/v1/admin/blocks?scope=user", None, 400, "invalid_request")
    await drive.expect("GET", "/v1/admin/blocks?limit=x", None, 400, "invalid_request")
    await drive.expect("GET", "/v1/admin/usage?id=u", None, 400, "invalid_request")

    monkeypatch.delenv("RATELIMITD_KEY_PEPPER")
    drive.client = await serve(config)      # no pepper: every key call says so
    for method, path, body in routes[:4]:
        await drive.expect(method, path, body, 503, "keys_unavailable")

    not_driven = documented() - drive.seen
    assert {(status, code) for _, _, status, code in not_driven} <= NOT_DRIVEN_HERE, \
        sorted(not_driven)
