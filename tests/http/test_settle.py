"""Reserve, commit and release together; idempotency and dry runs."""

from __future__ import annotations

import asyncio
import base64
import string
import time
from typing import Any

import pytest
import tiktoken
from redis.asyncio import Redis

from tests.support.http import (
    UNKNOWN_RID,
    Serve,
    assert_error,
    call,
    cost_nano,
    limit_of,
    nano,
    rq,
    small,
    snapshot,
)

# -- reserve / commit / release ----------------------------------------------------------------

async def test_reserve_commit_charges_the_actual_cost(serve: Serve, redis_client: Redis) -> None:
    client = await serve(small(daily_budget_usd=1.0, tokens_per_day=100_000,
                               max_output_tokens=1000))
    resp, first = await call(client, "/v1/reserve", rq(input_tokens=1200, max_output_tokens=800))
    assert resp.status == 200, first
    estimate = cost_nano(1200, 800, pi=2.5, po=10.0)
    assert nano(first["reserved"]["cost_usd"]) == estimate == 11_000_000
    assert nano(limit_of(first, "daily_budget_usd")["remaining"]) == 1_000_000_000 - estimate

    commit = {"reservation_id": first["reservation_id"], "input_tokens": 1200,
              "cached_input_tokens": 1000, "output_tokens": 333}
    resp, done = await call(client, "/v1/commit", commit)
    assert resp.status == 200, done
    actual = cost_nano(1200, 333, 1000, pi=2.5, po=10.0, pc=1.25)
    assert actual == (200 * 2.5 + 1000 * 1.25 + 333 * 10.0) * 1000 == 5_080_000
    assert done == {"committed": True, "duplicate": False, "cost_usd": actual / 1e9,
                    "usage": {"input_tokens": 1200, "cached_input_tokens": 1000,
                              "output_tokens": 333},
                    "alerts": []}

    # what a reserve dry-runs is what it then reserves; both count the actual cost, not the
    # estimate, of the committed call
    resp, dry = await call(client, "/v1/reserve", rq(input_tokens=100, max_output_tokens=100,
                                                     dry_run=True))
    assert resp.status == 200, dry
    resp, second = await call(client, "/v1/reserve", rq(input_tokens=100, max_output_tokens=100))
    assert resp.status == 200, second
    second_est = cost_nano(100, 100, pi=2.5, po=10.0)
    assert nano(second["reserved"]["cost_usd"]) == second_est
    budget = limit_of(second, "daily_budget_usd")["remaining"]
    assert nano(budget) == 1_000_000_000 - actual - second_est
    assert limit_of(second, "tokens_per_day")["remaining"] == 100_000 - (1200 + 333) - 200
    assert limit_of(second, "requests_per_minute")["remaining"] == 5 - 2
    assert limit_of(second, "max_concurrent")["remaining"] == 3 - 1   # the first slot is free
    assert [(d["name"], d["remaining"]) for d in dry["limits"]] == \
        [(s["name"], s["remaining"]) for s in second["limits"]]

    # a repeated commit answers the same, flagged, and charges nothing more
    before = await snapshot(redis_client)
    for repeat in (commit, {**commit, "cached_input_tokens": 0, "output_tokens": 900}):
        resp, again = await call(client, "/v1/commit", repeat)
        assert resp.status == 200, again
        assert again == {**done, "duplicate": True}
    assert await snapshot(redis_client) == before


async def test_commit_over_the_reservation_reports_the_overrun_and_charges_it(
        serve: Serve) -> None:
    client = await serve(small(tokens_per_day=1000, daily_budget_usd=1.0, max_output_tokens=100))
    resp, rsv = await call(client, "/v1/reserve", rq(input_tokens=100))
    assert resp.status == 200 and rsv["max_output_tokens"] == 100, rsv
    resp, done = await call(client, "/v1/commit", {"reservation_id": rsv["reservation_id"],
                                                  "input_tokens": 100, "output_tokens": 1000})
    assert resp.status == 200, done
    actual = cost_nano(100, 1000, pi=2.5, po=10.0)
    reserved = cost_nano(100, 100, pi=2.5, po=10.0)
    assert nano(done["cost_usd"]) == actual
    assert done["overrun"]["tokens"] == 1100 - 200
    assert nano(done["overrun"]["cost_usd"]) == actual - reserved
    # charged in full: 1100 of 1000 tokens are spent, so the next reserve is denied
    resp, body = await call(client, "/v1/reserve", rq(input_tokens=1))
    assert resp.status == 429, body
    assert body["reason"] == "tokens_per_day"
    assert limit_of(body, "tokens_per_day")["remaining"] == 0
    assert nano(limit_of(body, "daily_budget_usd")["remaining"]) == 1_000_000_000 - actual


async def test_commit_within_the_reservation_has_no_overrun(serve: Serve) -> None:
    client = await serve(small())
    resp, rsv = await call(client, "/v1/reserve", rq(input_tokens=100, max_output_tokens=100))
    resp, done = await call(client, "/v1/commit", {"reservation_id": rsv["reservation_id"],
                                                  "input_tokens": 100, "output_tokens": 100})
    assert resp.status == 200, done
    assert "overrun" not in done
    assert nano(done["cost_usd"]) == nano(rsv["reserved"]["cost_usd"])


async def test_release_refunds_everything(serve: Serve, redis_client: Redis) -> None:
    client = await serve(small())
    body = rq(input_tokens=500, max_output_tokens=200)
    resp, first = await call(client, "/v1/reserve", body)
    assert resp.status == 200, first
    resp, released = await call(client, "/v1/release",
                                {"reservation_id": first["reservation_id"]})
    assert resp.status == 200, released
    assert released == {"released": True, "duplicate": False}
    before = await snapshot(redis_client)
    resp, again = await call(client, "/v1/release", {"reservation_id": first["reservation_id"]})
    assert resp.status == 200 and again == {"released": True, "duplicate": True}
    assert await snapshot(redis_client) == before
    # the same call again finds every limit as the first one did: the first left no trace
    resp, second = await call(client, "/v1/reserve", body)
    assert resp.status == 200, second
    assert [(s["name"], s["remaining"]) for s in second["limits"]] == \
        [(f["name"], f["remaining"]) for f in first["limits"]]


async def test_commit_counts_output_text_with_tiktoken(serve: Serve) -> None:
    client = await serve(small())
    text = "Bonjour ! Voici la réponse : 42. ✅ Les fourmis ont six pattes."
    for model, extra in (("gpt-4o", {"model": "gpt-4o"}), ("gpt-4", {"model": "gpt-4"}),
                         ("gpt-4o", {})):                    # no model: the default o200k_base
        resp, rsv = await call(client, "/v1/reserve", rq(input_tokens=10))
        assert resp.status == 200, rsv
        resp, done = await call(client, "/v1/commit",
                                {"reservation_id": rsv["reservation_id"], "input_tokens": 10,
                                 "output_text": text, **extra})
        assert resp.status == 200, done
        n_out = len(tiktoken.encoding_for_model(model).encode(text))
        assert done["usage"]["output_tokens"] == n_out, model
        assert nano(done["cost_usd"]) == cost_nano(10, n_out, pi=2.5, po=10.0)


async def test_commit_after_release_and_release_after_commit_are_409(
        serve: Serve, redis_client: Redis) -> None:
    client = await serve(small())
    _, a = await call(client, "/v1/reserve", rq(input_tokens=10))
    _, b = await call(client, "/v1/reserve", rq(input_tokens=10))
    await call(client, "/v1/release", {"reservation_id": a["reservation_id"]})
    await call(client, "/v1/commit", {"reservation_id": b["reservation_id"],
                                      "input_tokens": 10, "output_tokens": 1})
    before = await snapshot(redis_client)
    resp, body = await call(client, "/v1/commit", {"reservation_id": a["reservation_id"],
                                                  "input_tokens": 10, "output_tokens": 1})
    assert_error(resp, body, 409, "reservation_released", "reservation_id")
    resp, body = await call(client, "/v1/release", {"reservation_id": b["reservation_id"]})
    assert_error(resp, body, 409, "reservation_committed", "reservation_id")
    assert await snapshot(redis_client) == before


@pytest.mark.parametrize("rid", [
    UNKNOWN_RID,                                   # well-formed, never issued (user:u1)
    "rsv_" + "B" * 24 + ".dXNlcjpub2JvZHk",        # well-formed, another user's slot
    "rsv_AAAA.dXNlcjp1MQ",                         # random part too short
    "hello",
    "rsv_",
    "rsv_???.!!!",
    "rsv_abc." + "x" * 900,
])
async def test_commit_and_release_of_unknown_ids_are_404(serve: Serve, redis_client: Redis,
                                                         rid: str) -> None:
    client = await serve(small())
    await call(client, "/v1/reserve", rq(input_tokens=10))
    before = await snapshot(redis_client)
    resp, body = await call(client, "/v1/commit", {"reservation_id": rid, "input_tokens": 1,
                                                  "output_tokens": 1})
    assert_error(resp, body, 404, "reservation_not_found", "reservation_id")
    resp, body = await call(client, "/v1/release", {"reservation_id": rid})
    assert_error(resp, body, 404, "reservation_not_found", "reservation_id")
    assert await snapshot(redis_client) == before


def _other_spellings(rid: str) -> list[str]:
    """Every spelling of rid that a lenient base64 decoder reads as the same bytes, among:
    another last character (differing in unused bits only), padding, the standard alphabet's
    + and /, characters the decoder skips."""
    head, _, blob = rid.partition(".")
    candidates = [blob[:-1] + c for c in string.ascii_letters + string.digits + "-_"]
    candidates += [blob + "=", blob + "==", blob + "===", f"{blob[:5]}\n{blob[5:]}",
                   f"{blob[:5]}!{blob[5:]}", f"{blob[:4]}!!!!{blob[4:]}", blob + " ",
                   blob.replace("-", "+"), blob.replace("_", "/")]
    return [f"{head}.{c}" for c in dict.fromkeys(candidates)
            if c != blob and _lenient(c) == _lenient(blob)]


def _lenient(blob: str) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4))
    except ValueError:
        return None


async def test_a_reservation_id_is_accepted_only_as_it_was_given(
        serve: Serve, redis_client: Redis) -> None:
    """Another spelling of a real id (which a lenient decoder reads as the same bytes) is not
    that reservation: 404, nothing charged, and the id itself still commits."""
    client = await serve(small())
    for user in ("u1", "a-much-longer-user-name@example.com"):
        resp, rsv = await call(client, "/v1/reserve", rq(user=user, input_tokens=10))
        assert resp.status == 200, rsv
        rid = rsv["reservation_id"]
        spellings = _other_spellings(rid)
        assert len(spellings) >= 4, spellings
        before = await snapshot(redis_client)
        for spelling in spellings:
            resp, body = await call(client, "/v1/commit", {"reservation_id": spelling,
                                                          "input_tokens": 10, "output_tokens": 5})
            assert_error(resp, body, 404, "reservation_not_found", "reservation_id")
            resp, body = await call(client, "/v1/release", {"reservation_id": spelling})
            assert_error(resp, body, 404, "reservation_not_found", "reservation_id")
        assert await snapshot(redis_client) == before
        resp, done = await call(client, "/v1/commit", {"reservation_id": rid,
                                                      "input_tokens": 10, "output_tokens": 5})
        assert resp.status == 200 and done["duplicate"] is False, done


async def test_a_limit_of_another_scope_denies_all_or_nothing(serve: Serve) -> None:
    """An ip limit lives in another Redis slot than the user's: when it denies, what the
    user's slot had reserved is given back, and a release frees both."""
    client = await serve({"tiers": {"t": {
        "requests_per_minute": 100,
        "limits": [{"name": "per_ip", "scope": "ip", "metric": "requests", "window": "1m",
                    "limit": 2}]}}})

    def from_ip(user: str, ip: str) -> dict[str, Any]:
        return {"user": user, "tier": "t", "model": "gpt-4o", "input_tokens": 10,
                "max_output_tokens": 10, "attributes": {"ip": ip}}

    resp, a = await call(client, "/v1/reserve", from_ip("a", "2001:db8::7"))
    assert resp.status == 200, a
    assert limit_of(a, "per_ip")["scope"] == "ip"
    # the same address spelled otherwise is the same subject
    resp, b = await call(client, "/v1/reserve", from_ip("b", "2001:0DB8:0:0::7"))
    assert resp.status == 200, b
    assert limit_of(b, "per_ip")["remaining"] == 0
    resp, c = await call(client, "/v1/reserve", from_ip("c", "2001:db8::7"))
    assert resp.status == 429 and c["reason"] == "per_ip", c
    # c's own limits kept nothing of the denied call
    resp, c2 = await call(client, "/v1/reserve", from_ip("c", "192.0.2.1"))
    assert resp.status == 200, c2
    assert limit_of(c2, "requests_per_minute")["remaining"] == 99
    # releasing a's call frees its place on the ip limit too
    resp, _ = await call(client, "/v1/release", {"reservation_id": a["reservation_id"]})
    assert resp.status == 200
    resp, c3 = await call(client, "/v1/reserve", from_ip("c", "2001:db8::7"))
    assert resp.status == 200, c3
    assert limit_of(c3, "requests_per_minute")["remaining"] == 98


@pytest.mark.parametrize("user", ["{u1}", "a}b{c%7D", "名前 with spaces", "x" * 256,
                                  "user:u1", "dXNlcjp1MQ=="])
async def test_any_user_id_gets_its_own_limits_and_a_working_reservation(
        serve: Serve, user: str) -> None:
    client = await serve(small())
    resp, mine = await call(client, "/v1/reserve", {**rq(input_tokens=10), "user": user})
    assert resp.status == 200, mine
    resp, other = await call(client, "/v1/reserve", rq(input_tokens=10))       # user u1
    assert limit_of(other, "requests_per_minute")["remaining"] == 4              # not shared
    resp, done = await call(client, "/v1/commit", {"reservation_id": mine["reservation_id"],
                                                  "input_tokens": 10, "output_tokens": 3})
    assert resp.status == 200 and done["duplicate"] is False, done
    resp, again = await call(client, "/v1/reserve", {**rq(input_tokens=10), "user": user})
    assert limit_of(again, "tokens_per_day")["remaining"] == 2000 - 13 - 310


async def test_an_expired_reservation_is_404_and_its_estimate_stays_charged(
        serve: Serve) -> None:
    client = await serve({**small(), "reservations": {"ttl_s": 1, "commit_grace_s": 0}})
    resp, rsv = await call(client, "/v1/reserve", rq(input_tokens=100, max_output_tokens=100))
    assert resp.status == 200, rsv
    assert 0 < rsv["expires_at_ms"] - time.time() * 1000 <= 1000
    await asyncio.sleep(1.1)
    resp, body = await call(client, "/v1/commit", {"reservation_id": rsv["reservation_id"],
                                                  "input_tokens": 100, "output_tokens": 10})
    assert_error(resp, body, 404, "reservation_not_found", "expired")
    resp, body = await call(client, "/v1/release", {"reservation_id": rsv["reservation_id"]})
    assert_error(resp, body, 404, "reservation_not_found")
    resp, again = await call(client, "/v1/reserve", rq(input_tokens=100, max_output_tokens=100))
    assert limit_of(again, "tokens_per_day")["remaining"] == 2000 - 2 * 200
    assert limit_of(again, "requests_per_minute")["remaining"] == 3


# -- idempotency and dry runs ------------------------------------------------------------------

def _limits_only(snap: dict[bytes, Any]) -> dict[bytes, Any]:
    """A snapshot's limit state, without the reservation records."""
    return {k: v for k, v in snap.items() if b":r:" not in k}


async def test_idempotency_key_returns_the_first_reservation_and_charges_once(
        serve: Serve, redis_client: Redis) -> None:
    client = await serve(small())
    body = rq(input_tokens=100, idempotency_key="req-7f3a")
    resp, first = await call(client, "/v1/reserve", body)
    assert resp.status == 200 and first["duplicate"] is False, first
    before = await snapshot(redis_client)
    resp, again = await call(client, "/v1/reserve", body)
    assert resp.status == 200, again
    assert again["duplicate"] is True
    assert again["reservation_id"] == first["reservation_id"]
    for key in ("expires_at_ms", "input_tokens", "max_output_tokens", "reserved"):
        assert again[key] == first[key], key
    assert limit_of(again, "requests_per_minute")["remaining"] == 4
    # nothing charged: the limits are as they were (the record only changed hands: the retry
    # took it over, so a late cancel of the first attempt leaves it alone)
    assert _limits_only(await snapshot(redis_client)) == _limits_only(before)
    # another key is another call
    resp, other = await call(client, "/v1/reserve", {**body, "idempotency_key": "req-8b1c"})
    assert other["reservation_id"] != first["reservation_id"] and other["duplicate"] is False
    assert limit_of(other, "requests_per_minute")["remaining"] == 3
    # the retried reservation commits once
    commit = {"reservation_id": again["reservation_id"], "input_tokens": 100,
              "output_tokens": 10}
    _, done = await call(client, "/v1/commit", commit)
    assert done["duplicate"] is False


async def test_an_idempotency_key_reused_for_another_request_is_422_not_a_retry_loop(
        serve: Serve, redis_client: Redis) -> None:
    org_limit = {"name": "org_rpm", "scope": "org", "metric": "requests", "window": "60s",
                 "limit": 100}
    client = await serve(small(limits=[org_limit]))
    first_body = rq(input_tokens=100, org="acme", idempotency_key="req-1")
    resp, first = await call(client, "/v1/reserve", first_body)
    assert resp.status == 200, first
    before = _limits_only(await snapshot(redis_client))
    other_org = {**first_body, "org": "globex"}
    other_input = {**first_body, "input_tokens": 101}
    for body in (other_org, other_input):
        resp, answer = await call(client, "/v1/reserve", body)
        assert_error(resp, answer, 422, "idempotency_key_reused", "idempotency_key")
        assert "Retry-After" not in resp.headers
    assert _limits_only(await snapshot(redis_client)) == before      # nothing charged
    commit = {"reservation_id": first["reservation_id"], "input_tokens": 100,
              "output_tokens": 10}
    resp, done = await call(client, "/v1/commit", commit)
    assert resp.status == 200, done
    # once the first is committed, the other request is still refused (never "retry shortly")
    resp, answer = await call(client, "/v1/reserve", other_org)
    assert_error(resp, answer, 422, "idempotency_key_reused")
    # the same request is still answered with the first reservation, charging nothing
    committed = _limits_only(await snapshot(redis_client))
    resp, again = await call(client, "/v1/reserve", first_body)
    assert resp.status == 200 and again["duplicate"] is True, again
    assert again["reservation_id"] == first["reservation_id"]
    assert _limits_only(await snapshot(redis_client)) == committed
    # the key is the user's: another user may use it for anything
    resp, theirs = await call(client, "/v1/reserve", {**other_org, "user": "u2"})
    assert resp.status == 200 and theirs["duplicate"] is False, theirs


async def test_dry_run_answers_and_reserves_nothing(serve: Serve, redis_client: Redis) -> None:
    client = await serve(small())
    await call(client, "/v1/reserve", rq(input_tokens=100))
    before = await snapshot(redis_client)
    for _ in range(3):
        resp, body = await call(client, "/v1/reserve", rq(input_tokens=100, dry_run=True))
        assert resp.status == 200, body
        assert body["allowed"] is True and body["dry_run"] is True
        assert body["reservation_id"] is None
        assert body["max_output_tokens"] == 300
        assert limit_of(body, "requests_per_minute")["remaining"] == 3   # as if reserving
    assert await snapshot(redis_client) == before


