"""The decision routes' lane (http/lane.py) over raw sockets: pipelined requests answered in
order, bodies in pieces, the connection handed to aiohttp at the first request the lane does
not take, and answers identical to aiohttp's for the same request."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from ratelimitd.http.lane import MAX_HEAD_BYTES
from tests.support.http import Serve

TIER = {"t": {"requests_per_minute": 100000, "anomaly": False}}
RESERVE = {"user": "u1", "tier": "t", "model": "gpt-4o", "input_tokens": 10,
           "max_output_tokens": 10}


def post(path: str, body: Any, *headers: str) -> bytes:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    head = "".join(f"{h}\r\n" for h in headers)
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{head}"
            f"Content-Length: {len(raw)}\r\n\r\n").encode() + raw


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, size: int) -> None:
        self.status, self.headers, self.body, self.size = status, headers, body, size

    def json(self) -> Any:
        return orjson.loads(self.body)


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode().split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers["content-length"]))
    return Answer(int(lines[0].split()[1]), headers, body, len(head) + len(body))


async def connect(client: TestClient[Any, Any]
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(client.host, client.port)


async def test_pipelined_requests_are_answered_in_order_then_aiohttp_takes_over(
        serve: Serve) -> None:
    client = await serve({"tiers": TIER})
    reader, writer = await connect(client)
    writer.write(post("/v1/reserve", RESERVE, "X-Request-Id: first")
                 + post("/v1/commit", {"reservation_id": "rsv_x"}, "X-Request-Id: second")
                 + b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id: third\r\n\r\n"
                 + post("/v1/reserve", RESERVE, "X-Request-Id: fourth"))
    answers = [await read_answer(reader) for _ in range(4)]
    writer.close()
    assert [a.headers["x-request-id"] for a in answers] == ["first", "second", "third", "fourth"]
    assert [a.status for a in answers] == [200, 400, 200, 200]
    assert answers[0].json()["allowed"] is True
    assert answers[1].json()["error"]["code"] == "invalid_request"
    assert answers[2].json() == {"status": "ok"}
    assert answers[3].json()["allowed"] is True


async def test_many_pipelined_reserves_each_get_their_answer(serve: Serve) -> None:
    client = await serve({"tiers": TIER})
    reader, writer = await connect(client)
    count = 300  # more than the lane reads ahead while it answers (MAX_WAITING_BYTES)
    writer.write(b"".join(post("/v1/reserve", RESERVE, f"X-Request-Id: r{i}")
                          for i in range(count)))
    answers = [await read_answer(reader) for _ in range(count)]
    writer.close()
    assert [a.headers["x-request-id"] for a in answers] == [f"r{i}" for i in range(count)]
    assert {a.status for a in answers} == {200}
    assert len({a.json()["reservation_id"] for a in answers}) == count


async def test_a_request_in_pieces_is_answered(serve: Serve) -> None:
    client = await serve({"tiers": TIER})
    reader, writer = await connect(client)
    request = post("/v1/reserve", RESERVE)
    head_end = request.index(b"\r\n\r\n")
    for piece in (request[:10], request[10:head_end + 2], request[head_end + 2:head_end + 9],
                  request[head_end + 9:]):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.05)
    answer = await read_answer(reader)
    writer.close()
    assert answer.status == 200 and answer.json()["allowed"] is True


async def test_connection_close_is_honoured(serve: Serve) -> None:
    client = await serve({"tiers": TIER})
    reader, writer = await connect(client)
    writer.write(post("/v1/reserve", RESERVE, "Connection: close"))
    answer = await read_answer(reader)
    assert answer.status == 200 and answer.headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
    writer.close()


@pytest.mark.parametrize("extra", [
    "Transfer-Encoding: chunked",   # a body the lane does not frame
    "Expect: 100-continue",
])
async def test_what_the_lane_leaves_to_aiohttp_is_answered_alike(serve: Serve,
                                                                 extra: str) -> None:
    """The same bad request, through the lane and through aiohttp: the same answer."""
    client = await serve({"tiers": TIER})
    body = orjson.dumps({**RESERVE, "tier": "nope"})
    reader, writer = await connect(client)
    writer.write(post("/v1/reserve", body, "X-Request-Id: lane"))
    lane = await read_answer(reader)
    if extra.startswith("Transfer-Encoding"):
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        writer.write(b"POST /v1/reserve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"X-Request-Id: aiohttp\r\n" + extra.encode() + b"\r\n\r\n" + chunked)
    else:
        writer.write(post("/v1/reserve", body, "X-Request-Id: aiohttp", extra))
        continued = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert continued.startswith(b"HTTP/1.1 100")
    handed = await read_answer(reader)
    writer.close()
    assert lane.status == handed.status == 400
    assert lane.body == handed.body
    assert lane.json()["error"]["code"] == "invalid_request"
    assert set(lane.headers) == set(handed.headers)
    for name in ("content-type", "server", "content-length"):
        assert lane.headers[name] == handed.headers[name]


async def test_a_head_larger_than_the_lane_reads_is_answered_by_aiohttp(serve: Serve) -> None:
    client = await serve({"tiers": TIER})
    reader, writer = await connect(client)
    padding = "a" * (MAX_HEAD_BYTES // 2)  # each header within aiohttp's bound, the head not
    writer.write(post("/v1/reserve", RESERVE, f"X-Padding-1: {padding}",
                      f"X-Padding-2: {padding}", "X-Request-Id: large")
                 + post("/v1/reserve", RESERVE, "X-Request-Id: after"))
    answers = [await read_answer(reader), await read_answer(reader)]
    writer.close()
    assert [a.headers["x-request-id"] for a in answers] == ["large", "after"]
    assert [a.json()["allowed"] for a in answers] == [True, True]


async def test_http_1_0_is_answered_by_aiohttp(serve: Serve) -> None:
    client = await serve({"tiers": TIER})
    reader, writer = await connect(client)
    raw = orjson.dumps(RESERVE)
    writer.write(b"POST /v1/reserve HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(raw), raw))
    answer = await read_answer(reader)
    writer.close()
    assert answer.status == 200 and answer.json()["allowed"] is True


async def test_the_access_log_counts_the_bytes_sent(serve: Serve,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    client = await serve({"tiers": TIER})
    reader, writer = await connect(client)
    with caplog.at_level(logging.INFO, logger="ratelimitd.access"):
        writer.write(post("/v1/reserve", RESERVE))
        answer = await read_answer(reader)
        await asyncio.sleep(0.05)
    writer.close()
    lines = [r for r in caplog.records if r.name == "ratelimitd.access"]
    assert len(lines) == 1
    line: Any = lines[0]
    assert (line.method, line.path, line.status) == ("POST", "/v1/reserve", 200)
    assert line.bytes == answer.size
    assert line.remote == "127.0.0.1"
