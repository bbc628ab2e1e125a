"""ratelimitd.client against a real daemon (create_app on a localhost port) and a real Redis.

What a gateway relies on: the guard commits the usage it was told on success and releases on
an exception or a cancellation; a retried reserve reuses its idempotency key, so a reserve
whose answer was lost is charged once; each error answer arrives as its exception.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from aiohttp import web
from redis.asyncio import Redis

from ratelimitd.client import (
    AuthError,
    BackendUnavailable,
    DaemonUnreachable,
    InvalidRequest,
    RatelimitdClient,
    RateLimited,
    ReservationConflict,
    ReservationNotFound,
    SyncRatelimitdClient,
)
from tests.client.helpers import (
    config,
    cost_nano,
    daemon_args,
    free_port,
    process,
    url_of,
    usage_of,
)
from tests.support.http import Serve
from tests.support.redis_servers import RedisServer

NOTHING = {"requests": 0, "tokens": 0, "concurrent": 0, "cost_nano": 0}
MESSAGES = [{"role": "user", "content": "Write a haiku about budgets"}]


async def daemon(serve: Serve, **limits: Any) -> str:
    return url_of(await serve(config(**limits)))


class Proxy:
    """A proxy in front of a daemon that records what passes. fail_first: the first request
    gets a 502. hold: the first request to that path is held, never passed on."""

    def __init__(self, daemon_url: str, *, fail_first: bool = False,
                 hold: str | None = None) -> None:
        self.daemon_url = daemon_url
        self.fail_first = fail_first
        self.hold = hold
        self.holding = asyncio.Event()
        self.seen: list[tuple[str, dict[str, Any]]] = []

    async def start(self, aiohttp_server: Any) -> str:
        app = web.Application()
        app.router.add_post("/{path:.*}", self.forward)
        return url_of_server(await aiohttp_server(app))

    async def forward(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen.append((request.path, body))
        if self.fail_first and len(self.seen) == 1:
            return web.Response(status=502, text="bad gateway")
        if request.path == self.hold and not self.holding.is_set():
            self.holding.set()
            await asyncio.Event().wait()  # until the caller hangs up
        async with aiohttp.ClientSession() as http, http.post(
                self.daemon_url + request.path, json=body) as resp:
            return web.Response(status=resp.status, body=await resp.read(),
                                content_type="application/json")


def url_of_server(server: Any) -> str:
    return str(server.make_url("")).rstrip("/")


async def test_reserve_commit_release_answers_are_typed(serve: Serve) -> None:
    async with RatelimitdClient(await daemon(serve)) as rl:
        first = await rl.reserve(user="u1", tier="t", model="gpt-4o", messages=MESSAGES,
                                 max_output_tokens=100)
        assert first.reservation_id and first.reservation_id.startswith("rsv_")
        assert first.max_output_tokens == 100 and first.input_tokens > 0
        assert first.reserved_tokens == first.input_tokens + 100
        assert first.idempotency_key and not first.duplicate
        assert {lim.name for lim in first.limits} >= {"requests_per_minute", "tokens_per_day"}
        assert first.headers["x-ratelimit-limit-requests"] == "50"

        done = await rl.commit(first.reservation_id, input_tokens=20, output_tokens=30)
        assert (done.input_tokens, done.output_tokens, done.duplicate) == (20, 30, False)
        assert round(done.cost_usd * 1e9) == cost_nano(20, 30)
        assert (await rl.commit(first.reservation_id, input_tokens=20,
                                output_tokens=30)).duplicate

        second = await rl.reserve(user="u1", tier="t", model="gpt-4o", input_tokens=10)
        assert second.reservation_id is not None
        assert not (await rl.release(second.reservation_id)).duplicate
        assert (await rl.release(second.reservation_id)).duplicate
        assert await usage_of(rl) == {"requests": 1, "tokens": 50, "concurrent": 0,
                                      "cost_nano": cost_nano(20, 30)}


async def test_guard_commits_the_usage_set_on_success(serve: Serve) -> None:
    async with RatelimitdClient(await daemon(serve)) as rl:
        async with rl.guard(user="u1", tier="t", model="gpt-4o", messages=MESSAGES) as call:
            assert call.max_output_tokens == 300  # the tier's cap
            assert (await usage_of(rl))["concurrent"] == 1
            call.set_usage(41, 17, cached_input_tokens=8)
        assert call.commit_result is not None and not call.commit_result.duplicate
        assert await usage_of(rl) == {"requests": 1, "tokens": 58, "concurrent": 0,
                                      "cost_nano": cost_nano(41, 17, 8)}


async def test_guard_commits_output_text_counted_by_the_daemon(serve: Serve) -> None:
    async with RatelimitdClient(await daemon(serve)) as rl:
        async with rl.guard(user="u1", tier="t", model="gpt-4o", input_tokens=12) as call:
            call.set_output_text("one two three")  # 3 tokens in o200k_base
        assert call.commit_result is not None
        assert (call.commit_result.input_tokens, call.commit_result.output_tokens) == (12, 3)
        assert (await usage_of(rl))["tokens"] == 15


async def test_guard_releases_on_an_exception(serve: Serve) -> None:
    async with RatelimitdClient(await daemon(serve)) as rl:
        with pytest.raises(KeyError):
            async with rl.guard(user="u1", tier="t", model="gpt-4o", input_tokens=50) as call:
                raise KeyError("the model call failed")
        assert call.release_result is not None and call.commit_result is None
        assert await usage_of(rl) == NOTHING
        rid = call.reservation.reservation_id
        assert rid is not None
        with pytest.raises(ReservationConflict) as err:  # released, so it cannot be committed
            await rl.commit(rid, input_tokens=50, output_tokens=1)
        assert err.value.status == 409


async def test_guard_releases_on_discard(serve: Serve) -> None:
    async with RatelimitdClient(await daemon(serve)) as rl:
        async with rl.guard(user="u1", tier="t", model="gpt-4o", input_tokens=50) as call:
            call.discard()  # e.g. the provider refused the call
        assert call.release_result is not None
        assert await usage_of(rl) == NOTHING


async def test_guard_releases_when_cancelled(serve: Serve) -> None:
    async with RatelimitdClient(await daemon(serve)) as rl:
        entered = asyncio.Event()

        async def model_call() -> None:
            async with rl.guard(user="u1", tier="t", model="gpt-4o", input_tokens=50):
                entered.set()
                await asyncio.Event().wait()  # a model call that never ends

        task = asyncio.create_task(model_call())
        await entered.wait()
        assert (await usage_of(rl))["concurrent"] == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await usage_of(rl) == NOTHING


async def test_a_second_cancellation_does_not_stop_the_release(
        serve: Serve, aiohttp_server: Any) -> None:
    """Cancelled again while the release is in flight (a timeout, then a shutdown): the
    release is sent again to its end, and close() waits for it. A proxy holds the first
    release and never passes it on, as when it is lost with the cancelled connection."""
    proxy = Proxy(await daemon(serve), hold="/v1/release")
    rl = RatelimitdClient(await proxy.start(aiohttp_server))
    entered = asyncio.Event()

    async def model_call() -> None:
        async with rl.guard(user="u1", tier="t", model="gpt-4o", input_tokens=50):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(model_call())
    await entered.wait()
    task.cancel()
    await proxy.holding.wait()  # the first release is in flight
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await rl.close()
    assert [path for path, _ in proxy.seen] == ["/v1/reserve", "/v1/release", "/v1/release"]
    async with RatelimitdClient(proxy.daemon_url) as check:
        assert await usage_of(check) == NOTHING


async def test_cancelled_while_reserving_releases_what_lands(
        serve: Serve, redis_client: Redis) -> None:
    """The caller gives up while the reserve waits on a stalled Redis; the reserve lands
    afterwards, and the guard releases it: nothing stays charged or held."""
    url = url_of(await serve({**config(), "redis": {"timeout_ms": 5000}}))
    async with RatelimitdClient(url, timeout_s=5) as rl:
        await usage_of(rl)  # the daemon is up and its scripts loaded
        await redis_client.execute_command("CLIENT", "PAUSE", "300", "ALL")
        reserving = asyncio.create_task(rl.guard(user="u1", tier="t", model="gpt-4o",
                                                 input_tokens=50).__aenter__())
        await asyncio.sleep(0.1)  # the reserve is at the daemon, waiting on Redis
        reserving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reserving
    async with RatelimitdClient(rl._base) as check:  # rl closed: its release has run
        assert await usage_of(check) == NOTHING


async def test_a_retried_reserve_reuses_its_idempotency_key(
        serve: Serve, redis_client: Redis) -> None:
    """Redis stalls once, longer than the client's timeout: the first attempt's answer is lost
    but its reserve lands when Redis wakes. The retries send the same (generated) key, so one
    of them gets that first reservation back, and the user is charged once."""
    url = url_of(await serve({**config(), "redis": {"timeout_ms": 5000}}))
    async with RatelimitdClient(url, timeout_s=0.25, retries=8, backoff_s=0.1,
                                max_backoff_s=0.2) as rl:
        await usage_of(rl)
        await redis_client.execute_command("CLIENT", "PAUSE", "700", "ALL")
        got = await rl.reserve(user="u1", tier="t", model="gpt-4o", input_tokens=50,
                               max_output_tokens=50)
        assert got.duplicate, "the answer came from a retry that found the first reservation"
        assert got.idempotency_key is not None and got.idempotency_key.startswith("rlc_")
        assert await usage_of(rl) == {"requests": 1, "tokens": 100, "concurrent": 1,
                                      "cost_nano": cost_nano(50, 50)}


async def test_a_proxys_502_is_retried_with_the_same_key(serve: Serve,
                                                         aiohttp_server: Any) -> None:
    """A proxy in front of the daemons fails the first attempt (502): the retry carries the
    same idempotency key, and goes through."""
    proxy = Proxy(await daemon(serve), fail_first=True)
    async with RatelimitdClient(await proxy.start(aiohttp_server), backoff_s=0.01) as rl:
        got = await rl.reserve(user="u1", tier="t", model="gpt-4o", input_tokens=5)
    assert got.reservation_id and not got.duplicate
    (_, first), (_, second) = proxy.seen
    assert first == second and first["idempotency_key"] == got.idempotency_key


async def test_a_degraded_admission_has_nothing_to_settle(serve: Serve) -> None:
    """[redis] on_error = "allow" with Redis down: admitted unchecked, no reservation id; the
    guard lets the call run and settles nothing."""
    url = url_of(await serve({**config(), "redis": {"on_error": "allow"}},
                             url=f"redis://127.0.0.1:{free_port()}/0"))
    async with RatelimitdClient(url) as rl, \
            rl.guard(user="u1", tier="t", model="gpt-4o", input_tokens=5) as call:
        call.set_usage(5, 5)
    assert call.reservation.degraded and call.reservation.reservation_id is None
    assert call.commit_result is None and call.settle_error is None


def test_the_client_imports_nothing_of_the_daemon() -> None:
    """Usable with aiohttp alone: importing it loads no server module or server dependency."""
    code = ("import sys, ratelimitd.client\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('redis', 'orjson', 'tiktoken', 'uvloop', 'hiredis', 'prometheus_client') "
            "or (m.startswith('ratelimitd.') and not m.startswith('ratelimitd.client'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# -- errors as exceptions --------------------------------------------------------------------

async def test_a_denial_is_rate_limited_with_retry_after(serve: Serve) -> None:
    async with RatelimitdClient(await daemon(serve, requests_per_minute=2)) as rl:
        for _ in range(2):
            await rl.reserve(user="u1", tier="t", model="gpt-4o", input_tokens=5)
        with pytest.raises(RateLimited) as err:
            await rl.reserve(user="u1", tier="t", model="gpt-4o", input_tokens=5)
    denied = err.value
    assert denied.status == 429 and denied.reason == "requests_per_minute"
    assert denied.retry_after_ms is not None and 0 < denied.retry_after_ms <= 61_000
    assert denied.retry_after == denied.retry_after_ms / 1000
    assert denied.headers["Retry-After"] == str(denied.retry_after_s)
    assert denied.headers["x-ratelimit-remaining-requests"] == "0"
    assert denied.denied_limit is not None and denied.denied_limit.remaining == 0


async def test_a_call_that_never_fits_is_an_invalid_request_not_a_rate_limit(
        serve: Serve) -> None:
    async with RatelimitdClient(await daemon(serve, tokens_per_day=100)) as rl:
        with pytest.raises(InvalidRequest) as err:
            await rl.reserve(user="u1", tier="t", model="gpt-4o", input_tokens=500)
    assert err.value.code == "exceeds_limit" and "tokens_per_day" in err.value.message


@pytest.mark.parametrize(("fields", "code"), [
    ({"prompt": "   "}, "empty_prompt"),
    ({"input_tokens": 5, "tier": "nope"}, "invalid_request"),
    ({"input_tokens": 5, "model": "no-such-model"}, "unknown_model"),
])
async def test_bad_input_is_invalid_request(serve: Serve, fields: dict[str, Any],
                                            code: str) -> None:
    url = url_of(await serve({**config(), "pricing": {"gpt-4o": {"input": 1, "output": 1},
                                                      "unknown_model": "deny"}}))
    async with RatelimitdClient(url) as rl:
        with pytest.raises(InvalidRequest) as err:
            await rl.reserve(**{"user": "u1", "tier": "t", "model": "gpt-4o", **fields})
    assert err.value.status == 400 and err.value.code == code and err.value.message


async def test_service_token_errors_are_auth_errors(serve: Serve) -> None:
    url = url_of(await serve({**config(),
                              "server": {"service_tokens": ["s3cret-0123456789abc"]}}))
    for token, code in ((None, "missing_credentials"), ("wrong", "invalid_service_token")):
        async with RatelimitdClient(url, service_token=token) as rl:
            with pytest.raises(AuthError) as err:
                await rl.reserve(user="u1", tier="t", model="gpt-4o", input_tokens=5)
        assert (err.value.status, err.value.code) == (401, code)
    async with RatelimitdClient(url, service_token="s3cret-0123456789abc") as rl:
        assert (await rl.reserve(user="u1", tier="t", model="gpt-4o",
                                 input_tokens=5)).reservation_id


async def test_unknown_reservation_is_not_found(serve: Serve) -> None:
    async with RatelimitdClient(await daemon(serve)) as rl:
        with pytest.raises(ReservationNotFound) as err:
            await rl.commit("rsv_" + "A" * 24 + ".dXNlcjp1MQ", input_tokens=1, output_tokens=1)
    assert (err.value.status, err.value.code) == (404, "reservation_not_found")


async def test_redis_down_is_backend_unavailable_after_the_retries(serve: Serve) -> None:
    url = url_of(await serve(config(), url=f"redis://127.0.0.1:{free_port()}/0"))
    async with RatelimitdClient(url, retries=2, backoff_s=0.01) as rl:
        with pytest.raises(BackendUnavailable) as err:
            await rl.reserve(user="u1", tier="t", model="gpt-4o", input_tokens=5)
    assert (err.value.status, err.value.code) == (503, "backend_unavailable")


async def test_no_daemon_is_daemon_unreachable() -> None:
    async with RatelimitdClient(f"http://127.0.0.1:{free_port()}", retries=1,
                                backoff_s=0.01) as rl:
        with pytest.raises(DaemonUnreachable):
            await rl.reserve(user="u1", tier="t", model="gpt-4o", input_tokens=5)


# -- the blocking wrapper, against `python -m ratelimitd serve` ----------------------------------

def test_sync_client_against_a_daemon_process(redis_server: RedisServer, tmp_path: Path) -> None:
    redis.Redis.from_url(redis_server.url).flushall()
    port = free_port()
    toml = (f'[server]\nlisten = ["127.0.0.1:{port}"]\n[redis]\nurl = "{redis_server.url}"\n'
            '[tiers.t]\nrequests_per_minute = 50\ntokens_per_day = 100000\n'
            'daily_budget_usd = 5.0\nmax_concurrent = 4\nmax_output_tokens = 300\n'
            '[pricing]\n"gpt-4o" = { input = 2.5, output = 10.0, cached_input = 1.25 }\n')
    with process(daemon_args(toml, tmp_path), port, "ratelimitd"), \
            SyncRatelimitdClient(f"http://127.0.0.1:{port}") as rl:
        with rl.guard(user="u1", tier="t", model="gpt-4o", prompt="hello there") as call:
            assert call.max_output_tokens == 300
            call.set_usage(7, 9)
        assert call.commit_result is not None and call.commit_result.output_tokens == 9
        with pytest.raises(ZeroDivisionError), \
                rl.guard(user="u1", tier="t", model="gpt-4o", input_tokens=5) as failed:
            _ = 1 / 0
        assert failed.release_result is not None
        probe = rl.reserve(user="u1", tier="t", model="gpt-4o", input_tokens=0,
                           max_output_tokens=16, dry_run=True)
        remaining = {lim.name: lim.remaining for lim in probe.limits}
        assert remaining["tokens_per_day"] == 100_000 - 16 - 16
        assert remaining["requests_per_minute"] == 50 - 1 - 1
