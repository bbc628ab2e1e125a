"""Invalid requests, routing errors and body size: clear 4xx, nothing charged."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.support.http import (
    Serve,
    assert_error,
    call,
    charged_keys,
    rq,
    small,
    snapshot,
)

# -- invalid requests --------------------------------------------------------------------------

VALIDATION = small(max_prompt_chars=1000, max_input_tokens=40)
VALIDATION["pricing"]["unknown_model"] = "deny"

BAD_RESERVES: list[tuple[Any, str, str]] = [
    ({**rq(input_tokens=1), "temperature": 0.2}, "invalid_request", "temperature"),
    ({**rq(input_tokens=1), "user": 42}, "invalid_request", "user"),
    ({**rq(input_tokens=1), "user": ""}, "invalid_request", "user"),
    ({**rq(input_tokens=1), "user": "a\nb"}, "invalid_request", "user"),
    ({"tier": "t", "model": "gpt-4o", "input_tokens": 1}, "invalid_request", "user"),
    ({"user": "u1", "tier": "t", "input_tokens": 1}, "invalid_request", "model"),
    (rq(input_tokens="10"), "invalid_request", "input_tokens"),
    (rq(input_tokens=-1), "invalid_request", "input_tokens"),
    (rq(input_tokens=True), "invalid_request", "input_tokens"),
    (rq(input_tokens=1.5), "invalid_request", "input_tokens"),
    (rq(input_tokens=1, max_output_tokens="lots"), "invalid_request", "max_output_tokens"),
    (rq(input_tokens=1, dry_run="yes"), "invalid_request", "dry_run"),
    (rq(input_tokens=1, attributes={"ip": "999.1.1.1"}), "invalid_request", "attributes.ip"),
    (rq(input_tokens=1, attributes={"ip": "not an ip"}), "invalid_request", "attributes.ip"),
    (rq(input_tokens=1, attributes=["ip"]), "invalid_request", "attributes"),
    (rq(input_tokens=1, attributes={"Device-ID": "x"}), "invalid_request", "attributes.Device-ID"),
    (rq(input_tokens=1, attributes={"device": 7}), "invalid_request", "device"),
    (rq(input_tokens=1, prompt="hi"), "invalid_request", "exactly one of prompt"),
    (rq(prompt="hi", messages=[{"role": "user", "content": "hi"}]), "invalid_request",
     "exactly one of prompt"),
    (rq(), "invalid_request", "exactly one of prompt"),
    (rq(prompt=["hi"]), "invalid_request", "prompt"),
    (rq(messages="hi"), "invalid_request", "messages"),
    (rq(messages=["hi"]), "invalid_request", "messages"),
    (rq(messages=[{"content": "hi"}]), "invalid_request", "messages[0].role"),
    (rq(messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                {"type": "image_url", "image_url": {}}]}]),
     "invalid_request", "messages[0].content[1]"),
    ({**rq(input_tokens=1), "api_key": "sk-live-123"}, "invalid_request", "api_key"),
    ({**rq(input_tokens=1), "signature": {"value": "ab"}}, "invalid_request", "signature"),
    (rq(input_tokens=1, tier="gold"), "invalid_request", "tier"),
    ([rq(input_tokens=1)], "invalid_request", "body"),
    ("just a string", "invalid_request", "body"),
    (rq(prompt=""), "empty_prompt", "prompt"),
    (rq(prompt="  \n\t "), "empty_prompt", "prompt"),
    (rq(messages=[{"role": "user", "content": ""}]), "empty_prompt", "messages"),
    (rq(messages=[]), "empty_prompt", "messages"),
    (rq(prompt="x" * 1001), "prompt_too_long", "1000"),
    (rq(messages=[{"role": "user", "content": "y" * 600}, {"role": "user", "content": "z" * 401}]),
     "prompt_too_long", "messages"),
    (rq(input_tokens=41), "too_many_input_tokens", "40"),
    (rq(prompt="word " * 60), "too_many_input_tokens", "input_tokens"),
    (rq(input_tokens=1, model="mystery-model-9"), "unknown_model", "mystery-model-9"),
]


@pytest.mark.parametrize(("body", "code", "mention"), BAD_RESERVES,
                         ids=[f"{c}-{m}"[:60] for _, c, m in BAD_RESERVES])
async def test_bad_reserve_is_400_and_changes_nothing(serve: Serve, redis_client: Redis,
                                                      body: Any, code: str, mention: str) -> None:
    client = await serve(VALIDATION)
    resp, ok = await call(client, "/v1/reserve", rq(input_tokens=10))
    assert resp.status == 200, ok
    before = await snapshot(redis_client)
    resp, answer = await call(client, "/v1/reserve", body)
    assert_error(resp, answer, 400, code, mention)
    assert await snapshot(redis_client) == before


async def test_limits_at_the_boundary_are_accepted(serve: Serve) -> None:
    client = await serve(VALIDATION)
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=40))
    assert resp.status == 200, body
    chars = await serve(small(max_prompt_chars=1000))
    resp, body = await call(chars, "/v1/reserve", rq(prompt="x" * 1000))
    assert resp.status == 200, body
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=1, model="gpt-4o-2024-08-06",
                                                      attributes={"ip": "2001:db8::1"}))
    assert resp.status == 200, body                              # a dated snapshot is priced


async def test_malformed_json_is_400(serve: Serve, redis_client: Redis) -> None:
    client = await serve(VALIDATION)
    for path in ("/v1/reserve", "/v1/commit", "/v1/release"):
        resp = await client.post(path, data=b'{"user": "u1", ',
                                 headers={"Content-Type": "application/json"})
        assert_error(resp, await resp.json(), 400, "invalid_request", "JSON")
    assert await charged_keys(redis_client) == []


BAD_SETTLES: list[tuple[str, Any, str]] = [
    ("/v1/commit", {"input_tokens": 1, "output_tokens": 1}, "reservation_id"),
    ("/v1/commit", {"reservation_id": 5, "input_tokens": 1, "output_tokens": 1},
     "reservation_id"),
    ("/v1/commit", {"reservation_id": "R", "output_tokens": 1}, "input_tokens"),
    ("/v1/commit", {"reservation_id": "R", "input_tokens": 1}, "output_tokens"),
    ("/v1/commit", {"reservation_id": "R", "input_tokens": 1, "output_tokens": 1,
                    "output_text": "x"}, "output_tokens"),
    ("/v1/commit", {"reservation_id": "R", "input_tokens": 1, "output_text": 5}, "output_text"),
    ("/v1/commit", {"reservation_id": "R", "input_tokens": 10, "output_tokens": -1},
     "output_tokens"),
    ("/v1/commit", {"reservation_id": "R", "input_tokens": 10, "cached_input_tokens": 11,
                    "output_tokens": 1}, "cached_input_tokens"),
    ("/v1/commit", {"reservation_id": "R", "input_tokens": 1, "output_tokens": 1, "cost": 1},
     "cost"),
    ("/v1/release", {}, "reservation_id"),
    ("/v1/release", {"reservation_id": "R", "reason": "timeout"}, "reason"),
    ("/v1/release", ["R"], "body"),
]


@pytest.mark.parametrize(("path", "body", "mention"), BAD_SETTLES)
async def test_bad_commit_or_release_is_400_and_changes_nothing(
        serve: Serve, redis_client: Redis, path: str, body: Any, mention: str) -> None:
    client = await serve(small())
    resp, rsv = await call(client, "/v1/reserve", rq(input_tokens=10))
    assert resp.status == 200
    if isinstance(body, dict) and body.get("reservation_id") == "R":
        body = {**body, "reservation_id": rsv["reservation_id"]}
    before = await snapshot(redis_client)
    resp, answer = await call(client, path, body)
    assert_error(resp, answer, 400, "invalid_request", mention)
    assert await snapshot(redis_client) == before
    # the reservation is still open: it commits normally afterwards
    resp, done = await call(client, "/v1/commit", {"reservation_id": rsv["reservation_id"],
                                                  "input_tokens": 10, "output_tokens": 1})
    assert resp.status == 200 and done["duplicate"] is False


# -- routing errors ----------------------------------------------------------------------------

async def test_unknown_path_is_404_json(serve: Serve) -> None:
    client = await serve()
    for method, path in (("GET", "/"), ("POST", "/v1/reserv"), ("GET", "/v2/reserve")):
        resp, body = await call(client, path, method=method)
        assert_error(resp, body, 404, "not_found")


async def test_wrong_method_is_405_json_with_allow(serve: Serve) -> None:
    client = await serve()
    for method, path, allowed in (("GET", "/v1/reserve", "POST"), ("PUT", "/v1/commit", "POST"),
                                  ("DELETE", "/v1/release", "POST"),
                                  ("POST", "/healthz", "GET, HEAD"),
                                  ("POST", "/readyz", "GET, HEAD"),
                                  ("POST", "/openapi.json", "GET, HEAD")):
        resp, body = await call(client, path, method=method)
        assert_error(resp, body, 405, "method_not_allowed")
        assert resp.headers.get("Allow") == allowed, (method, path)


# -- body size ---------------------------------------------------------------------------------

async def test_body_over_max_body_bytes_is_413(serve: Serve, redis_client: Redis) -> None:
    client = await serve({**small(), "server": {"max_body_bytes": 2048}})

    def chunked(prompt_chars: int) -> AsyncIterator[bytes]:
        """A body with no Content-Length (Transfer-Encoding: chunked), in 100-byte chunks."""
        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"user": "u1", "tier": "t", "model": "gpt-4o", "prompt": "'
            for start in range(0, prompt_chars, 100):
                yield b"y" * min(100, prompt_chars - start)
            yield b'"}'
        return chunks()

    for path in ("/v1/reserve", "/v1/commit", "/v1/release"):
        resp, body = await call(client, path, rq(prompt="x" * 3000))   # Content-Length ~3100
        assert_error(resp, body, 413, "body_too_large", "2048")
        resp = await client.post(path, data=chunked(3000),
                                 headers={"Content-Type": "application/json"})
        assert_error(resp, await resp.json(), 413, "body_too_large", "2048")
    assert await charged_keys(redis_client) == []
    # just under the limit is fine, sized up front or chunked
    resp, body = await call(client, "/v1/reserve", rq(prompt="x" * 1900))
    assert resp.status == 200, body
    resp = await client.post("/v1/reserve", data=chunked(1900),
                             headers={"Content-Type": "application/json"})
    assert resp.status == 200, await resp.text()
    assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"


async def test_a_chunked_body_over_max_body_bytes_sent_whole_is_413(
        serve: Serve, redis_client: Redis) -> None:
    """Head, every chunk and the last chunk in one write: the body is whole before the
    handler reads it, and has no Content-Length to refuse it by."""
    client = await serve({**small(), "server": {"max_body_bytes": 2048}})
    body = b'{"user": "u1", "tier": "t", "model": "gpt-4o", "prompt": "' + b"y" * 3000 + b'"}'
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 500]), body[i:i + 500])
                      for i in range(0, len(body), 500))
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"POST /v1/reserve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks
                 + b"0\r\n\r\n")
    answer = await reader.read()
    writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(payload)["error"]["code"] == "body_too_large"
    assert await charged_keys(redis_client) == []


