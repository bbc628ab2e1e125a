"""Service tokens."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from tests.support.http import (
    Serve,
    assert_error,
    call,
    charged_keys,
    rq,
    small,
)

# -- service tokens ----------------------------------------------------------------------------

@pytest.fixture
def service_token_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("RATELIMITD_TEST_GATEWAY_TOKEN", "gw-from-env-5f2c-0123456789")
    return "gw-from-env-5f2c-0123456789"


async def test_service_tokens_guard_v1(serve: Serve, redis_client: Redis,
                                       service_token_env: str) -> None:
    client = await serve({**small(), "server": {
        "service_tokens": ["gw-literal-91ab-0123456789", "env:RATELIMITD_TEST_GATEWAY_TOKEN"]}})
    body = rq(input_tokens=10)
    for headers, code in (({}, "missing_credentials"),
                          ({"Authorization": "Basic Z3c6cGFzcw=="}, "missing_credentials"),
                          ({"Authorization": "Bearer"}, "missing_credentials"),
                          ({"Authorization": "Bearer "}, "missing_credentials"),
                          ({"Authorization": "Bearer gw-literal-91ac"}, "invalid_service_token"),
                          ({"Authorization": "Bearer env:RATELIMITD_TEST_GATEWAY_TOKEN"},
                           "invalid_service_token"),
                          ({"Authorization": "Bearer gw-literal-91ab-0123456789-and-more"},
                           "invalid_service_token")):
        for path in ("/v1/reserve", "/v1/commit", "/v1/release"):
            resp, answer = await call(client, path, body, headers=headers)
            assert_error(resp, answer, 401, code)
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert await charged_keys(redis_client) == []            # no unauthenticated call wrote
    for token in ("gw-literal-91ab-0123456789", service_token_env):
        resp, answer = await call(client, "/v1/reserve", body,
                                  headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 200, answer
        resp, answer = await call(client, "/v1/release",
                                  {"reservation_id": answer["reservation_id"]},
                                  headers={"Authorization": f"bearer {token}"})
        assert resp.status == 200, answer
    # health and description need no token
    for path in ("/healthz", "/readyz", "/openapi.json"):
        resp = await client.get(path)
        assert resp.status == 200, path


async def test_without_service_tokens_v1_is_open(serve: Serve) -> None:
    client = await serve(small())
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=1),
                            headers={"Authorization": "Bearer anything"})
    assert resp.status == 200, body


