"""The webhook signature: what the daemon sends verifies; anything else does not."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from ratelimitd.alerts import signature_header, verify_webhook_signature

SECRET = "whsec-0123456789abcdef"
BODY = b'{"id":"alt_1","kind":"cost_threshold","spend_usd":0.81}'
NOW = 1_764_050_000


def test_the_header_is_hmac_sha256_of_timestamp_dot_body():
    expected = hmac.new(SECRET.encode(), b"1764050000." + BODY, hashlib.sha256).hexdigest()
    assert signature_header(SECRET, NOW, BODY) == f"t=1764050000,v1={expected}"


def test_a_fresh_signed_body_verifies():
    header = signature_header(SECRET, NOW, BODY)
    assert verify_webhook_signature(SECRET, header, BODY, NOW + 10, 300)
    assert verify_webhook_signature(SECRET.encode(), header, BODY, NOW - 10, 300)


@pytest.mark.parametrize("body", [BODY.replace(b"0.81", b"0.01"), BODY + b" ", b""])
def test_a_tampered_body_is_refused(body):
    assert not verify_webhook_signature(SECRET, signature_header(SECRET, NOW, BODY), body,
                                        NOW, 300)


def test_stale_and_future_timestamps_are_refused():
    header = signature_header(SECRET, NOW, BODY)
    assert not verify_webhook_signature(SECRET, header, BODY, NOW + 301, 300)
    assert not verify_webhook_signature(SECRET, header, BODY, NOW - 301, 300)


def test_a_replayed_header_with_a_new_timestamp_is_refused():
    header = signature_header(SECRET, NOW, BODY).replace("t=1764050000", "t=1764050100")
    assert not verify_webhook_signature(SECRET, header, BODY, NOW + 100, 300)


def test_another_secret_is_refused():
    header = signature_header("another-secret-of-16+", NOW, BODY)
    assert not verify_webhook_signature(SECRET, header, BODY, NOW, 300)


def test_any_matching_v1_is_enough_as_during_a_secret_rotation():
    good = signature_header(SECRET, NOW, BODY).split("v1=")[1]
    assert verify_webhook_signature(SECRET, f"t={NOW},v1={'0' * 64},v1={good}", BODY, NOW, 300)


@pytest.mark.parametrize("header", [
    None, "", "v1=abc", f"t={NOW}", f"t={NOW},v1=", "t=abc,v1=00", f"t={NOW},t={NOW},v1=00",
    "t=\u00b2,v1=00", f"t={NOW};v1=00", "x" * 2000])
def test_malformed_headers_are_refused(header):
    assert not verify_webhook_signature(SECRET, header, BODY, NOW, 300)
