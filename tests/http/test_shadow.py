"""Shadow limits on the HTTP API: counted and reported, never denying."""

from __future__ import annotations

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
