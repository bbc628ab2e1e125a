"""The admin API over real HTTP against a real Redis: admin tokens, keys, blocks, the per-network
limit on key creation; every answer validated against /openapi.json; nothing stored on a
refused call."""

from __future__ import annotations

import re
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.http.test_openapi import check_answer
from tests.support.http import Serve, assert_error, call, rq, snapshot
from tests.support.keys import (
    ADMIN,
    ADMIN_TOKEN,
    SERVICE,
    SERVICE_TOKEN,
    Client,
    admin,
    keys_config,
    new_key,
    pepper_env,
    reserve,
    two_daemons,
)

__all__ = ["pepper_env"]
pytestmark = pytest.mark.usefixtures("pepper_env")

KEY_ID = "key_" + "A" * 17
ROUTES = (("POST", "/v1/admin/keys", {"user": "u1", "tier": "t"}),
          ("POST", f"/v1/admin/keys/{KEY_ID}/rotate", None),
          ("POST", f"/v1/admin/keys/{KEY_ID}/revoke", None),
          ("GET", f"/v1/admin/keys/{KEY_ID}", None),
          ("POST", "/v1/admin/blocks", {"scope": "user", "id": "u1", "ttl_s": 60,
                                        "reason": "r"}),
          ("DELETE", "/v1/admin/blocks?scope=user&id=u1", None),
          ("GET", "/v1/admin/blocks", None))


async def checked(client: Client, method: str, path: str, body: Any = None, *,
                  headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One admin call, its answer validated against the OpenAPI document."""
    resp, answer = await call(client, path, body, method=method,
                              headers=ADMIN if headers is None else headers)
    template = re.sub(r"/v1/admin/keys/[^/]+", "/v1/admin/keys/{key_id}", path.split("?")[0])
    check_answer(method, template, resp.status, answer)
    return resp.status, answer


async def test_admin_routes_refuse_no_token_a_service_token_and_a_wrong_one(
        serve: Serve, redis_client: Redis) -> None:
    client = await serve(keys_config())
    before = await snapshot(redis_client)
    for method, path, body in ROUTES:
        for headers, status, code in (({}, 401, "missing_credentials"),
                                      (SERVICE, 403, "admin_token_required"),
                                      ({"Authorization": "Bearer nope"}, 401,
                                       "invalid_admin_token"),
                                      ({"Authorization": f"Basic {ADMIN_TOKEN}"}, 401,
                                       "missing_credentials")):
            resp, answer = await call(client, path, body, method=method, headers=headers)
            assert_error(resp, answer, status, code)
    # an admin token is not a service token either
    resp, answer = await call(client, "/v1/reserve", rq(tier="t", input_tokens=1),
                              headers=ADMIN)
    assert_error(resp, answer, 401, "invalid_service_token")
    assert await snapshot(redis_client) == before


async def test_without_admin_tokens_admin_routes_are_closed_and_say_how_to_open_them(
        serve: Serve) -> None:
    config = keys_config()
    config["server"] = {"service_tokens": [SERVICE_TOKEN]}
    client = await serve(config)
    for method, path, body in ROUTES:
        for headers, status in (({}, 401), (SERVICE, 403), (ADMIN, 401)):
            resp, answer = await call(client, path, body, method=method, headers=headers)
            assert_error(resp, answer, status, answer["error"]["code"],
                         "[server] admin_tokens")
    open_config = keys_config()
    open_config["server"] = {}                 # no token of any kind: /v1/admin/ still closed
    client = await serve(open_config)
    resp, answer = await call(client, "/v1/admin/blocks", method="GET")
    assert_error(resp, answer, 401, "missing_credentials", "[server] admin_tokens")


async def test_the_key_lifecycle(serve: Serve) -> None:
    a, b = await two_daemons(serve, keys_config())
    status, created = await checked(a, "POST", "/v1/admin/keys",
                                    {"user": "u1", "tier": "t", "org": "acme",
                                     "expires_in_days": 30, "require_signature": True})
    assert status == 201 and created["api_key"].startswith("rlk_") and created["signing_secret"]
    key_id = created["key_id"]
    status, info = await checked(b, "GET", f"/v1/admin/keys/{key_id}")
    assert status == 200
    assert (info["user"], info["org"], info["tier"], info["state"]) == ("u1", "acme", "t",
                                                                          "active")
    assert info["require_signature"] is True
    status, rotated = await checked(b, "POST", f"/v1/admin/keys/{key_id}/rotate",
                                    {"grace_s": 600})
    assert status == 201 and rotated["old_key_id"] == key_id and rotated["signing_secret"]
    status, again = await checked(a, "POST", f"/v1/admin/keys/{key_id}/rotate")
    assert (status, again["error"]["code"]) == (409, "key_rotated")
    status, info = await checked(a, "GET", f"/v1/admin/keys/{key_id}")
    assert (info["state"], info["rotated_to"]) == ("rotated", rotated["key_id"])
    for daemon in (a, b):
        status, answer = await checked(daemon, "POST",
                                       f"/v1/admin/keys/{rotated['key_id']}/revoke")
        assert (status, answer) == (200, {"revoked": True})
    status, info = await checked(b, "GET", f"/v1/admin/keys/{rotated['key_id']}")
    assert info["state"] == "revoked" and info["revoked_at_ms"] > 0
    status, answer = await checked(a, "POST", f"/v1/admin/keys/{rotated['key_id']}/rotate")
    assert (status, answer["error"]["code"]) == (409, "key_revoked")
    for method, path in (("GET", f"/v1/admin/keys/{KEY_ID}"),
                         ("POST", f"/v1/admin/keys/{KEY_ID}/revoke"),
                         ("POST", f"/v1/admin/keys/{KEY_ID}/rotate"),
                         ("GET", "/v1/admin/keys/not-an-id")):
        resp, answer = await call(a, path, method=method, headers=ADMIN)
        assert_error(resp, answer, 404, "key_not_found")


async def test_bad_admin_input_is_a_400_naming_the_field_and_stores_nothing(
        serve: Serve, redis_client: Redis) -> None:
    client = await serve(keys_config())
    key_id = (await new_key(client))["key_id"]
    before = await snapshot(redis_client)
    cases: list[tuple[str, str, Any, str]] = [
        ("POST", "/v1/admin/keys", {"tier": "t"}, "user"),
        ("POST", "/v1/admin/keys", {"user": "u1", "tier": "nope"}, "tier"),
        ("POST", "/v1/admin/keys", {"user": "u1", "tier": "t", "expires_in_days": 0},
         "expires_in_days"),
        ("POST", "/v1/admin/keys", {"user": "u1", "tier": "t", "expires_in_days": 91},
         "expires_in_days"),
        ("POST", "/v1/admin/keys", {"user": "u1", "tier": "t", "require_signature": "yes"},
         "require_signature"),
        ("POST", "/v1/admin/keys", {"user": "u1", "tier": "t", "colour": "red"}, "colour"),
        ("POST", "/v1/admin/keys", {"user": "u1", "tier": "t", "attributes": {"ip": "1.2.3"}},
         "attributes.ip"),
        ("POST", "/v1/admin/keys", [1], "body"),
        ("POST", f"/v1/admin/keys/{key_id}/rotate", {"grace_s": -1}, "grace_s"),
        ("POST", f"/v1/admin/keys/{key_id}/rotate", {"grace": 1}, "grace"),
        ("POST", f"/v1/admin/keys/{key_id}/revoke", {"now": True}, "now"),
        ("POST", "/v1/admin/blocks", {"scope": "user", "id": "u1", "ttl_s": 60}, "reason"),
        ("POST", "/v1/admin/blocks", {"scope": "User", "id": "u1", "ttl_s": 60,
                                      "reason": "r"}, "scope"),
        ("POST", "/v1/admin/blocks", {"scope": "global", "id": "*", "ttl_s": 60,
                                      "reason": "r"}, "scope"),
        ("POST", "/v1/admin/blocks", {"scope": "ip", "id": "nope", "ttl_s": 60,
                                      "reason": "r"}, "id"),
        ("POST", "/v1/admin/blocks", {"scope": "user", "id": "u1", "ttl_s": 0,
                                      "reason": "r"}, "ttl_s"),
        ("POST", "/v1/admin/blocks", {"scope": "user", "id": "u1", "ttl_s": 60,
                                      "reason": "x" * 201}, "reason"),
        ("DELETE", "/v1/admin/blocks?scope=user", None, "id"),
        ("GET", "/v1/admin/blocks?limit=lots", None, "limit"),
    ]
    for method, path, body, field in cases:
        status, answer = await checked(client, method, path, body)
        assert status == 400, (path, body, answer)
        assert answer["error"]["message"].startswith(f"{field}:"), (field, answer)
    resp, answer = await call(client, "/v1/admin/keys", method="PUT", headers=ADMIN)
    assert_error(resp, answer, 405, "method_not_allowed")
    assert resp.headers["Allow"] == "POST"
    resp, answer = await call(client, "/v1/admin/blocks", method="PUT", headers=ADMIN)
    assert resp.headers["Allow"] == "POST, DELETE, GET"
    assert await snapshot(redis_client) == before


async def test_a_block_refuses_its_subjects_reserves_on_every_daemon_until_lifted(
        serve: Serve) -> None:
    a, b = await two_daemons(serve, keys_config())
    created = await new_key(a, org="acme")
    for scope, ident in (("user", "u1"), ("org", "acme"), ("key", created["key_id"]),
                         ("ip", "192.0.2.10"), ("ip_prefix", "192.0.2.0/24"),
                         ("device", "d-42")):
        status, block = await checked(a, "POST", "/v1/admin/blocks",
                                      {"scope": scope, "id": ident, "ttl_s": 120,
                                       "reason": "chargeback"})
        assert status == 201 and block["reason"] == "chargeback"
        for daemon in (a, b):
            resp, body = await reserve(daemon, created["api_key"], "192.0.2.10",
                                       attributes={"device": "d-42"})
            assert_error(resp, body, 403, "blocked", f"{scope} {ident}", "chargeback")
            assert 119 <= int(resp.headers["Retry-After"]) <= 120
        status, listed = await checked(b, "GET", "/v1/admin/blocks")
        assert [(x["scope"], x["id"]) for x in listed["blocks"]] == [(scope, ident)]
        status, removed = await checked(b, "DELETE",
                                        f"/v1/admin/blocks?scope={scope}&id={ident}")
        assert (status, removed) == (200, {"removed": True})
        resp, body = await reserve(a, created["api_key"], "192.0.2.10",
                                   attributes={"device": "d-42"})
        assert resp.status == 200, body
    status, removed = await checked(a, "DELETE", "/v1/admin/blocks?scope=user&id=u1")
    assert removed == {"removed": False}
    # a user block holds for identity reserves too, not only for keys
    await checked(a, "POST", "/v1/admin/blocks",
                  {"scope": "user", "id": "u2", "ttl_s": 60, "reason": "fraud"})
    resp, body = await call(b, "/v1/reserve", rq(user="u2", tier="t", input_tokens=1),
                            headers=SERVICE)
    assert_error(resp, body, 403, "blocked", "fraud")


async def test_key_creation_is_limited_per_network_of_the_end_user(
        serve: Serve, redis_client: Redis) -> None:
    a, b = await two_daemons(serve, keys_config(keys={"creations_per_ip_prefix_per_hour": 3}))
    for i in range(3):
        await new_key((a, b)[i % 2], user=f"signup-{i}", attributes={"ip": f"198.51.100.{i}"})
    before = await snapshot(redis_client)
    for daemon in (a, b):
        resp, answer = await admin(daemon, "POST", "/v1/admin/keys",
                                   {"user": "signup-x", "tier": "t",
                                    "attributes": {"ip": "198.51.100.200"}})
        assert_error(resp, answer, 429, "too_many_key_creations", "198.51.100.0/24")
        assert 3500 < int(resp.headers["Retry-After"]) <= 3660   # + a sub-bucket at most
        check_answer("POST", "/v1/admin/keys", 429, answer)
    assert await snapshot(redis_client) == before           # no key made, nothing counted
    # another network, and the operator's own calls (no attributes), are not limited
    await new_key(b, user="signup-y", attributes={"ip": "203.0.113.5"})
    await new_key(a, user="signup-z")
    # a blocked network cannot make keys at all
    await admin(a, "POST", "/v1/admin/blocks", {"scope": "ip_prefix", "id": "203.0.113.0/24",
                                                "ttl_s": 60, "reason": "sign-up fraud"})
    resp, answer = await admin(b, "POST", "/v1/admin/keys",
                               {"user": "signup-w", "tier": "t",
                                "attributes": {"ip": "203.0.113.6"}})
    assert_error(resp, answer, 403, "blocked", "sign-up fraud")
