"""The contracts the docs state hold for the code: the signing example's value, and the
webhook verifier of docs/webhooks.md accepting a real signed delivery (and nothing else)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import orjson

from ratelimitd.alerts import AlertService
from ratelimitd.alerts.signing import signature_header
from ratelimitd.auth.signatures import canonical_string, sign_request
from tests.alerts.helpers import SECRET, Receiver, alerts_config, make_alerts, wait_until
from tests.alerts.test_delivery import receivers, services
from tests.docs.runner import ROOT, blocks

__all__ = ["receivers", "services"]


def test_the_signing_example_is_what_sign_request_makes() -> None:
    text = (ROOT / "docs" / "signing.md").read_text()
    shown = orjson.loads(next(b.text for b in blocks(ROOT / "docs" / "signing.md")
                              if b.language == "json"))
    secret = re.search(r"secret `(rls_\w+)`", text)
    body = re.search(r"the\s+body `(\{.*?\})` at", text, re.S)
    assert secret is not None and body is not None
    made = sign_request(secret.group(1), shown["method"], shown["path"],
                        body.group(1).encode(), timestamp=shown["timestamp"],
                        nonce=shown["nonce"])
    assert made == shown
    assert "\n".join(["v1", "{timestamp}", "{nonce}", "{method}", "{path}",
                      "{body_sha256}"]) in text
    assert canonical_string(1, "n", "POST", "/p", "h") == "v1\n1\nn\nPOST\n/p\nh"


def doc_verifier() -> Callable[..., bool]:
    source = next(b.text for b in blocks(ROOT / "docs" / "webhooks.md")
                  if b.file == "verify_webhook.py")
    assert len(source.strip().splitlines()) <= 10
    namespace: dict[str, Any] = {}
    exec(compile(source, "verify_webhook.py", "exec"), namespace)
    verify: Callable[..., bool] = namespace["verify"]
    return verify


async def test_the_documented_verifier_accepts_a_real_delivery_and_nothing_else(
        receivers: Callable[[], Receiver], services: Callable[..., AlertService]) -> None:
    receiver = receivers()
    await receiver.start()
    service = services(alerts_config(receiver.url))
    await service.start()
    alert = make_alerts(1)[0]
    service.submit([alert])
    await wait_until(lambda: bool(receiver.received), "a delivery")
    got = receiver.received[0]
    assert got.signature is not None and got.alert_id_header == alert.id
    assert set(orjson.loads(got.body)) == {
        "id", "version", "kind", "severity", "subject", "limit", "threshold", "spend_usd",
        "budget_usd", "observed", "baseline", "period_start_ms", "created_ms"}
    verify = doc_verifier()
    assert verify(SECRET.encode(), got.signature, got.body)
    assert not verify(SECRET.encode(), got.signature, got.body + b" ")
    assert not verify(b"another-secret-0123", got.signature, got.body)
    now = int(time.time())
    assert verify(SECRET.encode(), signature_header(SECRET, now - 290, got.body), got.body)
    assert not verify(SECRET.encode(), signature_header(SECRET, now - 310, got.body), got.body)
