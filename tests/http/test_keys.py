"""API keys over HTTP, each attack replayed on two daemons (apps) sharing one real Redis.

Credential stuffing, leaked keys (revoked, expired, rotated past grace), throwaway accounts
behind one network, replayed and forged signatures; and the hygiene around them: keys and
secrets never in clear in Redis or in the logs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from ratelimitd.auth.keys import generate_api_key
from ratelimitd.auth.signatures import sign_request
from tests.support.http import Serve, assert_error, call, limit_of, rq
from tests.support.keys import (
    ADMIN_TOKEN,
    PEPPER,
    SERVICE,
    SERVICE_TOKEN,
    admin,
    assert_absent,
    keys_config,
    new_key,
    pepper_env,
    redis_dump,
    reserve,
    two_daemons,
)

__all__ = ["pepper_env"]
pytestmark = pytest.mark.usefixtures("pepper_env")

INVALID = "invalid_api_key"


# -- credential stuffing ------------------------------------------------------------------------

async def test_a_loop_of_wrong_keys_blocks_the_address_on_every_daemon(
        serve: Serve, redis_client: Redis) -> None:
    a, b = await two_daemons(serve, keys_config(abuse={"auth_failures_per_ip": 5,
                                                       "block_s": 900}))
    key = (await new_key(a))["api_key"]
    attacker, bystander = "198.51.100.7", "203.0.113.9"
    messages = set()
    for i in range(5):   # wrong keys of every kind, on both daemons, all answered alike
        wrong = [generate_api_key(), "rlk_" + "x" * 36, "sk-live-123",
                 key[:-1] + ("1" if key[-1] == "0" else "0")][i % 4]
        resp, body = await reserve((a, b)[i % 2], wrong, attacker)
        assert_error(resp, body, 401, INVALID)
        messages.add(body["error"]["message"])
    assert len(messages) == 1                       # no oracle in the message
    resp, body = await reserve(b, generate_api_key(), attacker)          # the 6th failure
    assert_error(resp, body, 403, "blocked", "198.51.100.7", "failed API key lookups")
    assert 899 <= int(resp.headers["Retry-After"]) <= 900
    for daemon in (a, b):
        # the attacker's address is refused even with a valid key, and without one
        resp, body = await reserve(daemon, key, attacker)
        assert_error(resp, body, 403, "blocked", "198.51.100.7")
        assert int(resp.headers["Retry-After"]) > 890
        resp, body = await call(daemon, "/v1/reserve",
                                rq(tier="t", input_tokens=1, attributes={"ip": attacker}),
                                headers=SERVICE)
        assert_error(resp, body, 403, "blocked")
        # ... while the same key still works from another address
        resp, body = await reserve(daemon, key, bystander)
        assert resp.status == 200, body
    # the refused reserves charged nothing: only the bystander's two calls count
    assert limit_of(body, "requests_per_minute")["remaining"] == 58
    # an IPv6 client walking its /64 is counted as one
    for i in range(6):
        resp, body = await reserve(a, generate_api_key(), f"2001:db8:1:2::{i + 1:x}")
    assert_error(resp, body, 403, "blocked", "2001:db8:1:2::/64")


async def test_a_loop_of_bad_signatures_blocks_the_address_like_wrong_keys(
        serve: Serve) -> None:
    a, b = await two_daemons(serve, keys_config(abuse={"auth_failures_per_ip": 5,
                                                       "block_s": 900}))
    created = await new_key(a, require_signature=True)
    key, secret = created["api_key"], created["signing_secret"]
    body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    attacker, bystander = "198.51.100.8", "203.0.113.10"
    for i in range(5):   # a valid key, signatures guessed, on both daemons
        guess = sign_request("rls_" + f"{i:02x}" * 32, "POST", "/v1/chat/completions", body)
        resp, answer = await reserve((a, b)[i % 2], key, attacker, signature=guess)
        assert_error(resp, answer, 401, "invalid_signature")
    guess = sign_request("rls_" + "ff" * 32, "POST", "/v1/chat/completions", body)
    resp, answer = await reserve(b, key, attacker, signature=guess)        # the 6th failure
    assert_error(resp, answer, 403, "blocked", "198.51.100.8", "signatures")
    # blocked now even with an authentic signature; another address is served
    signed = sign_request(secret, "POST", "/v1/chat/completions", body)
    resp, answer = await reserve(a, key, attacker, signature=signed)
    assert_error(resp, answer, 403, "blocked", "198.51.100.8")
    resp, answer = await reserve(a, key, bystander,
                                 signature=sign_request(secret, "POST", "/v1/chat/completions",
                                                        body))
    assert resp.status == 200, answer


# -- leaked keys: revoked, expired, rotated ----------------------------------------------------

async def test_a_revocation_reaches_the_other_daemon_within_1s(
        serve: Serve, record_property: Any) -> None:
    a, b = await two_daemons(serve, keys_config())
    created = await new_key(a)
    for daemon in (a, b):                  # both daemons have the key in their cache now
        resp, body = await reserve(daemon, created["api_key"])
        assert resp.status == 200, body
    resp, body = await admin(a, "POST", f"/v1/admin/keys/{created['key_id']}/revoke")
    assert (resp.status, body) == (200, {"revoked": True})
    start = time.monotonic()
    while True:
        resp, body = await reserve(b, created["api_key"])
        if resp.status != 200:
            break
        assert time.monotonic() - start < 1.0, "the other daemon still takes the revoked key"
        await asyncio.sleep(0.002)
    elapsed = time.monotonic() - start
    record_property("revocation_reached_other_daemon_s", round(elapsed, 4))
    assert elapsed < 1.0
    assert_error(resp, body, 403, "key_revoked")
    resp, body = await reserve(a, created["api_key"])
    assert_error(resp, body, 403, "key_revoked")
    # a repeat revoke answers the same
    resp, body = await admin(b, "POST", f"/v1/admin/keys/{created['key_id']}/revoke")
    assert (resp.status, body) == (200, {"revoked": True})


async def test_a_rotated_key_works_for_its_grace_with_a_warning_then_is_refused(
        serve: Serve) -> None:
    a, b = await two_daemons(serve, keys_config())
    old = await new_key(a)
    resp, rotated = await admin(b, "POST", f"/v1/admin/keys/{old['key_id']}/rotate",
                                {"grace_s": 1})
    assert resp.status == 201, rotated
    assert rotated["old_key_id"] == old["key_id"] and rotated["api_key"] != old["api_key"]
    for daemon in (a, b):
        resp, body = await reserve(daemon, old["api_key"])
        assert resp.status == 200, body
        assert [w["code"] for w in body["warnings"]] == ["key_rotated"]
        assert rotated["key_id"] in body["warnings"][0]["message"]
        resp, body = await reserve(daemon, rotated["api_key"])
        assert resp.status == 200 and body["warnings"] == [], body
    await asyncio.sleep(1.2)               # past the grace
    for daemon in (a, b):
        resp, body = await reserve(daemon, old["api_key"])
        assert_error(resp, body, 403, "key_expired")
        resp, body = await reserve(daemon, rotated["api_key"])
        assert resp.status == 200, body


async def test_an_expired_key_is_refused_and_warned_of_before(
        serve: Serve, redis_client: Redis) -> None:
    a, b = await two_daemons(serve, keys_config(tier={"requests_per_minute": 2}))
    created = await new_key(a, expires_in_days=1)      # within warn_days (14): warned
    for daemon in (a, b):
        resp, body = await reserve(daemon, created["api_key"])
        assert resp.status == 200, body
        assert [w["code"] for w in body["warnings"]] == ["key_expiring"]
    resp, body = await reserve(a, created["api_key"])    # the warning rides on a 429 too
    assert resp.status == 429 and body["warnings"][0]["code"] == "key_expiring", body
    # A day is the shortest lifetime the API grants; move this key's end to 300 ms from now
    # in its record (Redis time), as a day passing would.
    seconds, micros = await redis_client.time()
    await redis_client.hset(f"rlk:{{{created['key_id']}}}", "e",
                            seconds * 1000 + micros // 1000 + 300)
    await asyncio.sleep(1.4)               # past the new end and the 1 s cache
    for daemon in (a, b):
        resp, body = await reserve(daemon, created["api_key"])
        assert_error(resp, body, 403, "key_expired")
    resp, info = await admin(b, "GET", f"/v1/admin/keys/{created['key_id']}")
    assert info["state"] == "expired"


# -- throwaway accounts behind one network -------------------------------------------------------

async def test_a_hundred_accounts_behind_one_24_share_its_ip_prefix_limit(serve: Serve) -> None:
    network_limit = {"name": "network_requests_per_hour", "scope": "ip_prefix",
                     "metric": "requests", "window": "1h", "limit": 30}
    a, b = await two_daemons(serve, keys_config(tier={"limits": [network_limit]}))
    keys = [(await new_key(a, user=f"throwaway-{i}"))["api_key"] for i in range(100)]
    answers = await asyncio.gather(*(reserve((a, b)[i % 2], key, f"203.0.113.{i + 1}")
                                     for i, key in enumerate(keys)))
    allowed = [body for resp, body in answers if resp.status == 200]
    denied = [body for resp, body in answers if resp.status == 429]
    assert (len(allowed), len(denied)) == (30, 70)
    assert {body["reason"] for body in denied} == {"network_requests_per_hour"}
    limit = limit_of(allowed[0], "network_requests_per_hour")
    assert limit["scope"] == "ip_prefix"
    # another network is not affected; IPv4-mapped IPv6 addresses are the IPv4 network
    resp, body = await reserve(b, keys[0], "198.51.100.1")
    assert resp.status == 200, body
    resp, body = await reserve(a, keys[1], "::ffff:203.0.113.250")
    assert resp.status == 429 and body["reason"] == "network_requests_per_hour", body
    resp, body = await reserve(a, keys[1], "203.0.113.999")
    assert_error(resp, body, 400, "invalid_request", "attributes.ip")


async def test_ip_prefix_networks_have_the_configured_lengths(serve: Serve) -> None:
    network_limit = {"name": "net_rpm", "scope": "ip_prefix", "metric": "requests",
                     "window": "60s", "limit": 2}
    a, b = await two_daemons(serve, keys_config(tier={"limits": [network_limit]},
                                                abuse={"ipv4_prefix": 16, "ipv6_prefix": 48}))
    for daemon, user, ip in ((a, "u1", "10.1.2.3"), (b, "u2", "10.1.200.4"),
                             (a, "u3", "2001:db8:7::1"), (b, "u4", "2001:db8:7:ffff::2")):
        resp, body = await call(daemon, "/v1/reserve",
                                rq(user=user, tier="t", input_tokens=1,
                                   attributes={"ip": ip}), headers=SERVICE)
        assert resp.status == 200, body
    for daemon, ip, network in ((a, "10.1.99.99", "10.1.0.0/16"),
                                (b, "2001:db8:7:1234::9", "2001:db8:7::/48")):
        resp, body = await call(daemon, "/v1/reserve",
                                rq(user="u9", tier="t", input_tokens=1,
                                   attributes={"ip": ip}), headers=SERVICE)
        assert resp.status == 429 and body["reason"] == "net_rpm", (network, body)
    resp, body = await call(a, "/v1/reserve", rq(user="u9", tier="t", input_tokens=1,
                                                 attributes={"ip": "10.2.0.1"}),
                            headers=SERVICE)
    assert resp.status == 200, body


async def test_limits_of_scope_key_count_per_key(serve: Serve) -> None:
    per_key = {"name": "key_rpm", "scope": "key", "metric": "requests", "window": "60s",
               "limit": 2}
    a, b = await two_daemons(serve, keys_config(tier={"limits": [per_key]}))
    first, second = (await new_key(a))["api_key"], (await new_key(a))["api_key"]
    for key in (first, second):            # same user, two keys: two budgets
        for daemon in (a, b):
            resp, body = await reserve(daemon, key)
            assert resp.status == 200, body
            assert limit_of(body, "key_rpm")["scope"] == "key"
        resp, body = await reserve(a, key)
        assert resp.status == 429 and body["reason"] == "key_rpm", body
    # a reserve without a key has no key to count: the limit does not apply
    resp, body = await call(b, "/v1/reserve", rq(tier="t", input_tokens=1), headers=SERVICE)
    assert resp.status == 200 and all(lim["name"] != "key_rpm" for lim in body["limits"])


# -- signed requests -------------------------------------------------------------------------------

async def test_fresh_signed_requests_pass_and_replayed_stale_or_tampered_ones_do_not(
        serve: Serve) -> None:
    a, b = await two_daemons(serve, keys_config())
    created = await new_key(a, require_signature=True)
    secret, key = created["signing_secret"], created["api_key"]
    client_body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user",
                                                                 "content": "hi"}]})

    def signed(**kw: Any) -> dict[str, Any]:
        return sign_request(secret, "POST", "/v1/chat/completions", client_body, **kw)

    fresh = signed()
    resp, body = await reserve(a, key, signature=fresh)
    assert resp.status == 200, body
    resp, body = await reserve(b, key, signature=fresh)                 # replay, other daemon
    assert_error(resp, body, 401, "invalid_signature", "nonce")
    resp, body = await reserve(b, key, signature=signed(timestamp=int(time.time()) - 301))
    assert_error(resp, body, 401, "invalid_signature", "timestamp")
    tampered = signed()
    tampered["body_sha256"] = "0" * 64                                   # another body
    resp, body = await reserve(a, key, signature=tampered)
    assert_error(resp, body, 401, "invalid_signature", "signature.value")
    forged = sign_request("rls_" + "ab" * 32, "POST", "/v1/chat/completions", client_body)
    resp, body = await reserve(b, key, signature=forged)
    assert_error(resp, body, 401, "invalid_signature")
    resp, body = await reserve(a, key)                                   # unsigned
    assert_error(resp, body, 401, "invalid_signature", "requires signed requests")
    resp, body = await reserve(a, key, signature={"value": "x"})
    assert_error(resp, body, 401, "invalid_signature", "signature.")
    resp, body = await reserve(b, key, signature=signed())               # fresh, other daemon
    assert resp.status == 200, body
    # only the two fresh ones were charged
    assert limit_of(body, "requests_per_minute")["remaining"] == 58
    # a key without a signing secret refuses a signature rather than ignore it
    plain = await new_key(a)
    resp, body = await reserve(a, plain["api_key"], signature=fresh)
    assert_error(resp, body, 401, "invalid_signature", "require_signature")


# -- input, and a daemon without a pepper ----------------------------------------------------------

async def test_key_fields_are_checked(serve: Serve) -> None:
    a = await serve(keys_config())
    key = (await new_key(a))["api_key"]
    for fields, field in (({"user": "u1"}, "api_key"), ({"tier": "t"}, "api_key"),
                          ({"org": "o"}, "api_key")):
        resp, body = await reserve(a, key, **fields)
        assert_error(resp, body, 400, "invalid_request", field, "not both")
    for bad in (7, "", "k" * 1025):
        resp, body = await call(a, "/v1/reserve", {"api_key": bad, "model": "gpt-4o",
                                                   "input_tokens": 1}, headers=SERVICE)
        assert_error(resp, body, 400, "invalid_request", "api_key")
    resp, body = await call(a, "/v1/reserve", rq(tier="t", input_tokens=1, signature={}),
                            headers=SERVICE)
    assert_error(resp, body, 400, "invalid_request", "signature")
    resp, body = await call(a, "/v1/reserve", {"model": "gpt-4o", "input_tokens": 1},
                            headers=SERVICE)
    assert_error(resp, body, 400, "invalid_request", "user")


async def test_without_a_pepper_keys_answer_503_and_the_rest_works(
        serve: Serve, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RATELIMITD_KEY_PEPPER")
    a = await serve(keys_config())
    resp, body = await reserve(a, generate_api_key())
    assert_error(resp, body, 503, "keys_unavailable", "RATELIMITD_KEY_PEPPER")
    resp, body = await admin(a, "POST", "/v1/admin/keys", {"user": "u1", "tier": "t"})
    assert_error(resp, body, 503, "keys_unavailable")
    resp, body = await call(a, "/v1/reserve", rq(tier="t", input_tokens=1), headers=SERVICE)
    assert resp.status == 200, body
    resp, body = await admin(a, "POST", "/v1/admin/blocks",
                             {"scope": "user", "id": "u1", "ttl_s": 60, "reason": "test"})
    assert resp.status == 201, body


# -- no key in clear, anywhere -----------------------------------------------------------------

async def test_no_key_or_secret_in_clear_in_redis_or_in_the_logs(
        serve: Serve, redis_client: Redis, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    a, b = await two_daemons(serve, keys_config(abuse={"auth_failures_per_ip": 3}))
    plain = await new_key(a, org="acme")
    signed_key = await new_key(b, require_signature=True)
    resp, rotated = await admin(a, "POST", f"/v1/admin/keys/{plain['key_id']}/rotate")
    assert resp.status == 201
    secrets_seen = [plain["api_key"], signed_key["api_key"], signed_key["signing_secret"],
                    rotated["api_key"], PEPPER, ADMIN_TOKEN, SERVICE_TOKEN]
    for daemon in (a, b):
        for key in (plain["api_key"], rotated["api_key"]):
            resp, body = await reserve(daemon, key, "192.0.2.1")
            assert resp.status == 200, body
        signature = sign_request(signed_key["signing_secret"], "POST", "/x", b"{}")
        resp, body = await reserve(daemon, signed_key["api_key"], signature=signature)
        assert resp.status == 200, body
        for _ in range(3):   # refused keys, then a block: their text must not be kept either
            wrong = generate_api_key()
            secrets_seen.append(wrong)
            await reserve(daemon, wrong, "192.0.2.66")
    await admin(b, "POST", f"/v1/admin/keys/{rotated['key_id']}/revoke")
    for key_id in (plain["key_id"], signed_key["key_id"]):
        resp, info = await admin(a, "GET", f"/v1/admin/keys/{key_id}")
        assert resp.status == 200 and "api_key" not in info and "signing_secret" not in info
    dump = await redis_dump(redis_client)
    assert len(dump) > 10
    assert_absent(secrets_seen, dump, "Redis")
    logs = [caplog.text.encode()] + [str(r.__dict__).encode() for r in caplog.records]
    assert_absent(secrets_seen, logs, "the logs")
