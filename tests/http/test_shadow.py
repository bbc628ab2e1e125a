"""Shadow limits on the HTTP API: counted and reported, never denying."""

from __future__ import annotations

import logging

import pytest

from tests.support.http import Serve, call

TIER = {"name": "rpm", "scope": "user", "metric": "requests", "window": "60s", "limit": 2}


async def _reserves(serve: Serve, config: dict[str, object], n: int) -> list[dict[str, object]]:
    client = await serve(config)
    bodies = []
    for _ in range(n):
        resp, body = await call(client, "/v1/reserve", {"user": "u", "tier": "t",
                                                        "model": "gpt-4o", "input_tokens": 5})
        assert resp.status == 200, body
        bodies.append(body)
    return bodies


async def test_a_shadow_limit_counts_reports_and_never_denies(serve: Serve) -> None:
    bodies = await _reserves(serve, {"tiers": {"t": {"limits": [{**TIER, "shadow": True}]}}}, 3)
    states = [body["limits"][0] for body in bodies]            # type: ignore[index]
    assert [s["remaining"] for s in states] == [1, 0, 0]
    assert [s["over"] for s in states] == [False, False, True]
    assert all(s["shadow"] is True for s in states)


async def test_server_shadow_mode_makes_every_limit_shadow(serve: Serve) -> None:
    config = {"server": {"shadow_mode": True}, "tiers": {"t": {"limits": [TIER]}}}
    bodies = await _reserves(serve, config, 3)
    assert bodies[2]["limits"][0]["over"] is True               # type: ignore[index]


async def test_shadow_overs_are_counted_per_limit_and_logged_once_a_window(
        serve: Serve, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ratelimitd.shadow")
    config = {"tiers": {"t": {"limits": [{**TIER, "shadow": True},
                                         {**TIER, "name": "rpm_hard", "limit": 100}]}}}
    client = await serve(config)
    resp = await client.get("/metrics")
    text = await resp.text()
    assert 'ratelimitd_shadow_over_total{limit="rpm"} 0.0' in text  # there from the start
    assert 'limit="rpm_hard"' not in text      # a limit that denies is no shadow limit
    for _ in range(5):
        resp, body = await call(client, "/v1/reserve", {"user": "u", "tier": "t",
                                                        "model": "gpt-4o", "input_tokens": 5})
        assert resp.status == 200, body
    text = await (await client.get("/metrics")).text()
    assert 'ratelimitd_shadow_over_total{limit="rpm"} 3.0' in text
    lines = [r for r in caplog.records if getattr(r, "event", None) == "shadow_over"]
    assert len(lines) == 1          # three overs, one line in the window
    assert lines[0].limit == "rpm" and lines[0].api == "http"   # type: ignore[attr-defined]
