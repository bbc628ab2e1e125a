"""JSON log lines: request ids, redaction, the access log over real HTTP, throttling."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from ratelimitd.ops.logs import (
    ACCESS_BYTES_KEPT,
    ACCESS_LINES_KEPT_S,
    ACCESS_PARTS_KEPT,
    REQUEST_ID_HEADER,
    JsonLinesHandler,
    ThrottledLog,
    access_log_options,
    flush_log,
    request_id_from,
    request_scope,
    setup_logging,
)
from tests.support.redis_servers import free_port

SECRETS = ("sk-gateway-token-123", "rlk_live_9f8e7d6c5b4a", "whsec_abcdef",
           "a" * 64, "s3cr3t-pepper")


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    setup_logging(logging.DEBUG, out)
    yield out
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in out.getvalue().splitlines()]


def test_one_json_object_per_line_with_the_request_id(stream: io.StringIO) -> None:
    log = logging.getLogger("ratelimitd.test")
    log.info("started on %s", "127.0.0.1:8080", extra={"workers": 2})
    with request_scope("gw-42.a:b") as request_id:
        log.warning("denied by %s", "requests_per_minute", extra={"tier": "free"})
    log.info("after")
    first, second, third = lines(stream)
    assert request_id == "gw-42.a:b"
    assert first["msg"] == "started on 127.0.0.1:8080" and first["workers"] == 2
    assert first["level"] == "info" and first["logger"] == "ratelimitd.test"
    assert first["ts"].endswith("Z") and "request_id" not in first
    assert second["request_id"] == "gw-42.a:b" and second["tier"] == "free"
    assert second["level"] == "warning"
    assert "request_id" not in third  # the scope ended with the request


@pytest.mark.parametrize("header", [None, "", "has space", 'quote"d', "x" * 129,
                                    "line\nbreak", "-leading-dash", "rlk_live_9f8e7d6c5b4a"])
def test_an_unusable_request_id_is_replaced(header: str | None) -> None:
    made = request_id_from(header)
    assert made != header and len(made) == 16 and int(made, 16) >= 0


def test_secrets_never_reach_a_line(stream: io.StringIO) -> None:
    log = logging.getLogger("ratelimitd.test")
    log.info("auth header Authorization: Bearer %s", SECRETS[0])
    log.warning("lookup failed for key %s", SECRETS[1])
    log.info("body %s", {"api_key": SECRETS[1], "signature": {"value": SECRETS[3]}})
    log.info("webhook", extra={"signing_secret": SECRETS[2], "api_key": SECRETS[1],
                               "headers": {"Authorization": "Bearer " + SECRETS[0]}})
    log.info("config pepper=%s token: %s", SECRETS[4], SECRETS[0])
    try:
        raise ValueError(f"bad key {SECRETS[1]} with signature {SECRETS[3]}")
    except ValueError:
        log.exception("failed")
    text = stream.getvalue()
    for secret in SECRETS:
        assert secret not in text, secret
    assert text.count("[redacted]") >= 9
    assert len(lines(stream)) == 6
    assert "ValueError" in lines(stream)[-1]["exc"]


def test_ordinary_fields_are_left_alone(stream: io.StringIO) -> None:
    logging.getLogger("t").info("reserve %s", "ok", extra={
        "input_tokens": 1234, "max_output_tokens": 500, "tier": "pro", "model": "gpt-4o"})
    (line,) = lines(stream)
    assert line["msg"] == "reserve ok"
    assert (line["input_tokens"], line["max_output_tokens"], line["tier"]) == (1234, 500, "pro")


async def _serve(access_log: bool) -> tuple[web.AppRunner, str]:
    async def hello(request: web.Request) -> web.Response:
        with request_scope(request.headers.get(REQUEST_ID_HEADER)) as request_id:
            logging.getLogger("ratelimitd.http").info("handling")
            return web.json_response({"ok": True}, headers={REQUEST_ID_HEADER: request_id})

    app = web.Application()
    app.router.add_get("/v1/admin/usage", hello)
    runner = web.AppRunner(app, **access_log_options(access_log))
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


async def test_access_log_over_real_http(stream: io.StringIO) -> None:
    started = time.time()
    runner, base = await _serve(access_log=True)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/v1/admin/usage?scope=user&id=u1", headers={
                    REQUEST_ID_HEADER: "gw-7", "Authorization": "Bearer " + SECRETS[0]}) as r:
                assert r.headers[REQUEST_ID_HEADER] == "gw-7"
            async with session.get(f"{base}/v1/admin/usage") as r:
                made = r.headers[REQUEST_ID_HEADER]
    finally:
        await runner.cleanup()
    await asyncio.sleep(ACCESS_LINES_KEPT_S * 2)  # the kept access lines are written by then
    found = lines(stream)
    access = [line for line in found if line["logger"] == "ratelimitd.access"]
    handling = [line for line in found if line["msg"] == "handling"]
    assert [a["request_id"] for a in access] == ["gw-7", made]
    assert [h["request_id"] for h in handling] == ["gw-7", made]
    assert access[0]["path"] == "/v1/admin/usage" and access[0]["status"] == 200
    assert access[0]["method"] == "GET" and access[0]["duration_ms"] >= 0
    for line in access:  # UTC to the millisecond, as every other line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
        when = datetime.strptime(line["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert started - 0.001 <= when.timestamp() <= time.time()
    assert SECRETS[0] not in stream.getvalue() and "u1" not in stream.getvalue()


async def test_access_log_redacts_a_path_each_time_it_is_answered(
        stream: io.StringIO) -> None:
    """The redacted parts of a line are kept per (method, path, status): the kept ones are
    the redacted ones, and the kept set stays bounded."""
    runner, base = await _serve(access_log=True)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(2):
                async with session.get(f"{base}/keys/{SECRETS[1]}") as r:
                    assert r.status == 404
            for n in range(ACCESS_PARTS_KEPT + 1):
                async with session.get(f"{base}/scan/{n}") as r:
                    assert r.status == 404
            async with session.get(f"{base}/keys/{SECRETS[1]}") as r:
                assert r.status == 404
    finally:
        await runner.cleanup()
    await asyncio.sleep(ACCESS_LINES_KEPT_S * 2)
    access = [line for line in lines(stream) if line["logger"] == "ratelimitd.access"]
    keyed = [line for line in access if line["path"].startswith("/keys/")]
    assert len(keyed) == 3
    assert {(line["path"], line["msg"]) for line in keyed} == {
        ("/keys/rlk_[redacted]", "GET /keys/rlk_[redacted] 404")}
    assert SECRETS[1] not in stream.getvalue()
    scans = [line for line in access if line["path"].startswith("/scan/")]
    assert len(scans) == ACCESS_PARTS_KEPT + 1
    assert [line["msg"] for line in scans[:2]] == ["GET /scan/0 404", "GET /scan/1 404"]


def _handler() -> JsonLinesHandler:
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, JsonLinesHandler)
    return handler


async def test_access_lines_are_written_together_in_order_with_records(
        stream: io.StringIO) -> None:
    """Kept up to ACCESS_LINES_KEPT_S, then one write; a record logged meanwhile, a full
    buffer and flush_log (a worker's end) write the kept lines first."""
    handler = _handler()
    stream.seek(0)
    stream.truncate()  # the loop's own debug line
    handler.write_line(b'{"n":1}')
    handler.write_line(b'{"n":2}')
    assert stream.getvalue() == ""
    await asyncio.sleep(ACCESS_LINES_KEPT_S * 2)
    assert [line["n"] for line in lines(stream)] == [1, 2]
    handler.write_line(b'{"n":3}')
    logging.getLogger("ratelimitd.test").info("a record")
    handler.write_line(b'{"n":4}')
    assert lines(stream)[-1]["msg"] == "a record"
    flush_log()
    assert [line.get("n", line.get("msg")) for line in lines(stream)] == [
        1, 2, 3, "a record", 4]
    big = b'{"n":5,"pad":"%s"}' % (b"x" * ACCESS_BYTES_KEPT)
    handler.write_line(big)
    assert lines(stream)[-1]["n"] == 5  # past ACCESS_BYTES_KEPT: written at once


def test_access_lines_without_an_event_loop_are_written_at_once(stream: io.StringIO) -> None:
    _handler().write_line(b'{"n":1}')
    assert lines(stream) == [{"n": 1}]


async def test_access_log_switched_off(stream: io.StringIO) -> None:
    runner, base = await _serve(access_log=False)
    try:
        async with aiohttp.ClientSession() as session, session.get(f"{base}/v1/admin/usage"):
            pass
    finally:
        await runner.cleanup()
    await asyncio.sleep(ACCESS_LINES_KEPT_S * 2)
    ours = [line["msg"] for line in lines(stream) if line["logger"].startswith("ratelimitd")]
    assert ours == ["handling"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_noisy_lines_are_throttled_then_summarized(stream: io.StringIO) -> None:
    clock = Clock()
    throttled = ThrottledLog(logging.getLogger("ratelimitd.http"), per_window=10, window_s=60,
                             clock=clock)
    written = [throttled.warning("malformed_request", "bad json from %s", "10.0.0.1")
               for _ in range(25)]
    assert written.count(True) == 10
    assert throttled.warning("oversized_body", "too big")  # another kind has its own allowance
    clock.now += 60
    assert throttled.warning("malformed_request", "bad json again")
    found = lines(stream)
    assert len(found) == 13
    summary = found[11]
    assert summary["suppressed"] == 15 and summary["kind"] == "malformed_request"
    assert summary["msg"] == "15 more malformed_request lines left out (at most 10 every 60 s)"
    assert found[12]["msg"] == "bad json again"
    for _ in range(12):
        throttled.warning("malformed_request", "x")
    throttled.flush_all()  # at shutdown
    assert lines(stream)[-1]["suppressed"] == 3
