"""Signed requests end to end: a key made with require_signature, its client signing with
ratelimitd.auth.signatures, two daemons verifying against one Redis."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest
from redis.asyncio import Redis

from ratelimitd.auth.keys import KeyStore, ResolvedKey
from ratelimitd.auth.signatures import (
    SignatureError,
    SignatureVerifier,
    parse_signature,
    sign_request,
)
from tests.support.clock import Clock

BODY = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
MAX_AGE_S = 300


@pytest.fixture
def verifier(redis_client: Redis) -> SignatureVerifier:
    return SignatureVerifier(redis_client, MAX_AGE_S)


@pytest.fixture
def other_verifier(second_client: Redis) -> SignatureVerifier:
    """The verifier of another daemon, on its own connection to the same Redis."""
    return SignatureVerifier(second_client, MAX_AGE_S)


async def signed_key(store: KeyStore) -> tuple[ResolvedKey, str]:
    created = await store.create("u1", "pro", require_signature=True)
    assert created.signing_secret is not None and created.signing_secret.startswith("rls_")
    resolved = await store.resolve(created.api_key)
    assert isinstance(resolved, ResolvedKey) and resolved.require_signature
    # the daemon derives the same secret the client was given
    assert resolved.signing_secret == created.signing_secret
    return resolved, created.signing_secret


def now_s(clock: Clock) -> int:
    return clock.now // 1000


async def refused(verifier: SignatureVerifier, signature: Any, secret: str, key_id: str,
                  now_ms: int) -> SignatureError:
    with pytest.raises(SignatureError) as exc:
        await verifier.verify(signature, secret, key_id, now_ms)
    assert (exc.value.status, exc.value.code) == (401, "invalid_signature")
    return exc.value


def test_the_value_is_the_documented_hmac() -> None:
    signature = sign_request("rls_secret", "post", "/v1/chat/completions", BODY,
                             timestamp=1_764_000_000, nonce="n" * 20)
    canonical = ("v1\n1764000000\n" + "n" * 20 + "\nPOST\n/v1/chat/completions\n"
                 + hashlib.sha256(BODY).hexdigest())
    assert signature == {
        "timestamp": 1_764_000_000, "nonce": "n" * 20, "method": "POST",
        "path": "/v1/chat/completions", "body_sha256": hashlib.sha256(BODY).hexdigest(),
        "value": hmac.new(b"rls_secret", canonical.encode(), hashlib.sha256).hexdigest()}
    assert sign_request("rls_secret", "POST", "/", b"")["nonce"] != sign_request(
        "rls_secret", "POST", "/", b"")["nonce"]


async def test_a_fresh_signature_passes_and_its_replay_on_another_daemon_is_refused(
        store: KeyStore, verifier: SignatureVerifier, other_verifier: SignatureVerifier,
        clock: Clock) -> None:
    key, secret = await signed_key(store)
    signature = sign_request(secret, "POST", "/v1/chat/completions", BODY,
                             timestamp=now_s(clock))
    checked = await verifier.verify(signature, secret, key.key_id, clock.now)
    assert checked.nonce == signature["nonce"]
    replay = await refused(other_verifier, signature, secret, key.key_id, clock.now + 1000)
    assert replay.reason == "replayed"
    again = await refused(verifier, signature, secret, key.key_id, clock.now)
    assert again.reason == "replayed"
    # a new nonce for the same request passes
    fresh = sign_request(secret, "POST", "/v1/chat/completions", BODY, timestamp=now_s(clock))
    await other_verifier.verify(fresh, secret, key.key_id, clock.now)


async def test_a_nonce_is_kept_as_long_as_its_signature_could_be_fresh(
        store: KeyStore, verifier: SignatureVerifier, redis_client: Redis,
        clock: Clock) -> None:
    key, secret = await signed_key(store)
    signature = sign_request(secret, "POST", "/p", BODY, timestamp=now_s(clock))
    await verifier.verify(signature, secret, key.key_id, clock.now)
    ttls = [await redis_client.pttl(k) async for k in redis_client.scan_iter("rln:*")]
    assert len(ttls) == 1 and 2 * MAX_AGE_S * 1000 - 5000 < ttls[0] <= 2 * MAX_AGE_S * 1000


async def test_stale_and_future_signatures_are_refused(
        store: KeyStore, verifier: SignatureVerifier, clock: Clock) -> None:
    key, secret = await signed_key(store)
    for skew in (-MAX_AGE_S - 1, MAX_AGE_S + 1):
        signature = sign_request(secret, "POST", "/p", BODY, timestamp=now_s(clock) + skew)
        assert (await refused(verifier, signature, secret, key.key_id, clock.now)).reason == (
            "stale")
    for skew in (-MAX_AGE_S, MAX_AGE_S):
        edge = sign_request(secret, "POST", "/p", BODY, timestamp=now_s(clock) + skew)
        await verifier.verify(edge, secret, key.key_id, clock.now)


async def test_tampered_signatures_are_refused_and_burn_no_nonce(
        store: KeyStore, verifier: SignatureVerifier, clock: Clock) -> None:
    key, secret = await signed_key(store)
    signature = sign_request(secret, "POST", "/v1/chat/completions", BODY,
                             timestamp=now_s(clock))
    tampered = [
        {**signature, "path": "/v1/embeddings"},
        {**signature, "method": "PUT"},
        {**signature, "body_sha256": hashlib.sha256(BODY + b" ").hexdigest()},
        {**signature, "timestamp": signature["timestamp"] - 1},
        {**signature, "value": signature["value"][:-1] + ("0" if signature["value"][-1] != "0"
                                                          else "1")},
    ]
    for forged in tampered:
        assert (await refused(verifier, forged, secret, key.key_id, clock.now)).reason == "bad"
    other = await store.create("u2", "pro", require_signature=True)
    assert other.signing_secret is not None
    wrong_key = sign_request(other.signing_secret, "POST", "/v1/chat/completions", BODY,
                             timestamp=now_s(clock), nonce=signature["nonce"])
    assert (await refused(verifier, wrong_key, secret, key.key_id, clock.now)).reason == "bad"
    # the forgeries stored nothing: the genuine signature with their nonce still passes
    await verifier.verify(signature, secret, key.key_id, clock.now)


async def test_a_rotated_key_gets_a_new_signing_secret(store: KeyStore,
                                                       verifier: SignatureVerifier,
                                                       clock: Clock) -> None:
    old_key, old_secret = await signed_key(store)
    rotated = await store.rotate(old_key.key_id)
    assert rotated.signing_secret is not None and rotated.signing_secret != old_secret
    new = await store.resolve(rotated.api_key)
    assert isinstance(new, ResolvedKey) and new.signing_secret == rotated.signing_secret
    by_old = sign_request(old_secret, "POST", "/p", BODY, timestamp=now_s(clock))
    assert (await refused(verifier, by_old, rotated.signing_secret, rotated.key_id,
                          clock.now)).reason == "bad"
    await verifier.verify(by_old, old_secret, old_key.key_id, clock.now)


@pytest.mark.parametrize(("change", "field"), [
    ({"timestamp": "1764000000"}, "timestamp"), ({"timestamp": True}, "timestamp"),
    ({"timestamp": -5}, "timestamp"), ({"nonce": "short"}, "nonce"),
    ({"nonce": "n" * 129}, "nonce"), ({"nonce": "bad nonce with spaces"}, "nonce"),
    ({"method": "post"}, "method"), ({"path": "no-slash"}, "path"),
    ({"path": "/a\nb"}, "path"), ({"path": "/" + "a" * 3000}, "path"),
    ({"body_sha256": "AB" * 32}, "body_sha256"), ({"value": "zz"}, "value"),
    ({"extra": 1}, "extra"),
])
def test_malformed_signatures_name_the_field(change: dict[str, Any], field: str) -> None:
    signature = {**sign_request("rls_s", "POST", "/p", b"", timestamp=1_764_000_000), **change}
    with pytest.raises(SignatureError) as exc:
        parse_signature(signature)
    assert exc.value.reason == "malformed" and f"signature.{field}" in exc.value.message


def test_a_missing_or_non_object_signature_is_refused() -> None:
    with pytest.raises(SignatureError) as missing:
        parse_signature(None)
    assert missing.value.reason == "missing"
    with pytest.raises(SignatureError) as not_object:
        parse_signature("deadbeef")
    assert not_object.value.reason == "malformed"
    incomplete = sign_request("rls_s", "POST", "/p", b"")
    del incomplete["nonce"]
    with pytest.raises(SignatureError, match=r"signature\.nonce: is required"):
        parse_signature(incomplete)
