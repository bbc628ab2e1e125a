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

from ratelimitd.http.edge import JsonAnswer
from ratelimitd.http.lane import MAX_HEAD_BYTES, encode_answer
from ratelimitd.ops.logs import REQUEST_ID_HEADER
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


async def test_an_allowed_reserve_is_written_as_aiohttp_writes_it(serve: Serve) -> None:
    """The lane writes a decision's answer itself (no web.Response): the same headers, in the
    same order, and the same body as aiohttp's for the same request."""
    client = await serve({"tiers": TIER})
    body = orjson.dumps({**RESERVE, "dry_run": True})
    reader, writer = await connect(client)
    writer.write(post("/v1/reserve", body, "X-Request-Id: same"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lane = await read_answer_after(head, reader)
    writer.write(b"POST /v1/reserve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"X-Request-Id: same\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    handed = await read_answer_after(head, reader)
    writer.close()
    assert lane[0].split(b"\r\n")[0] == handed[0].split(b"\r\n")[0] == b"HTTP/1.1 200 OK"
    assert untimed(lane[0]) == untimed(handed[0])
    lane_json, handed_json = orjson.loads(lane[1]), orjson.loads(handed[1])
    assert lane_json.pop("expires_at_ms") <= handed_json.pop("expires_at_ms")
    for answer in (lane_json, handed_json):  # the windows moved on between the two
        for limit in answer["limits"]:
            limit.pop("reset_ms")
    assert lane_json == handed_json and lane_json["dry_run"] is True


async def read_answer_after(head: bytes, reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return head, await reader.readexactly(length)


def untimed(head: bytes) -> list[bytes]:
    """A head's lines, those that tell the time (Date, resets) by their name only."""
    timed = (b"Date:", b"RateLimit:", b"x-ratelimit-reset-")
    return [line.partition(b":")[0] if line.startswith(timed) else line
            for line in head.split(b"\r\n")]


@pytest.mark.parametrize(("status", "keep_alive"), [(200, True), (429, True), (404, False)])
def test_a_json_answer_is_encoded_as_its_web_response(status: int, keep_alive: bool) -> None:
    answer = JsonAnswer({"allowed": False, "reason": "rpm"}, status,
                        {"RateLimit": '"rpm";r=0;t=60', "Retry-After": "60"})
    answer.headers[REQUEST_ID_HEADER] = "abc"
    assert encode_answer(answer, keep_alive) == encode_answer(answer.response(), keep_alive)


def test_a_header_with_a_line_break_is_refused() -> None:
    answer = JsonAnswer({}, 200, {"X-Request-Id": "a\r\nSet-Cookie: stolen=1"})
    with pytest.raises(ValueError, match="newline"):
        encode_answer(answer, True)
