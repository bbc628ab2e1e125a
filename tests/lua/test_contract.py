"""The Python-Lua contract (ratelimitd/quota/wire.py) holds on both sides.

The Lua names every code, format and reply field through constants the build writes from
wire.py; these tests prove it spells none of them itself, uses no name it does not declare,
and that real calls decode, field by field, into what the Lua meant. The scripts outside the
library (lua/scripts/) name wire.py's formats the same way.
"""

from __future__ import annotations

import re

import pytest
from redis.asyncio import Redis

from ratelimitd.policy import Limit, Prices
from ratelimitd.quota import wire
from ratelimitd.quota.engine import Engine
from ratelimitd.quota.library import read_sources
from ratelimitd.quota.model import ReserveRequest
from ratelimitd.quota.scripts import read_script, script_names
from ratelimitd.store.transport import BatchTransport
from tests.support.clock import Clock
from tests.support.quota import tier_plan

PRICES = Prices(input=3_000_000, output=15_000_000, cached_input=1_500_000)
_DECLARED = re.compile(r"^\s*local\s+(\w+(?:\s*,\s*\w+)*)\s*=", re.M)
_NAME = re.compile(r"\b[A-Z][A-Z0-9_]{1,}\b")


def _code(text: str) -> str:
    """Lua without comments and string literals."""
    lines = [re.sub(r"'[^'\n]*'|\"[^\"\n]*\"", "''", line).partition("--")[0]
             for line in text.splitlines()]
    return "\n".join(lines)


def _declared(text: str) -> set[str]:
    return {n.strip() for group in _DECLARED.findall(text) for n in group.split(",")}


def test_the_lua_declares_nothing_that_wire_generates() -> None:
    generated = _declared(wire.lua_constants())
    for name, text in read_sources().items():
        assert not _declared(text) & generated, name


def test_the_lua_spells_no_packed_format_of_its_own() -> None:
    for name, text in read_sources().items():
        # the formats come from wire.py; core.lua only builds '<' .. n longs or doubles
        literals = [f for f in re.findall(r"'(<[^']*)'", text) if f != "<"]
        assert literals == [], (name, literals)


def test_the_scripts_spell_no_packed_format_and_use_only_wire_formats() -> None:
    formats = _declared(wire.lua_formats(wire.FORMATS))
    for name in script_names():
        text = read_script(name)
        assert re.findall(r"'(<[^']*)'", text) == [], name
        assert not _declared(text) & formats, name
        assert set(_NAME.findall(_code(text))) <= formats | {"KEYS", "ARGV"}, name


def test_every_constant_the_lua_uses_is_declared() -> None:
    sources = read_sources()
    known = _declared(wire.lua_constants()) | {"KEYS", "ARGV", "ERR"}
    known |= {n for text in sources.values() for n in _declared(text)}
    for name, text in sources.items():
        used = set(_NAME.findall(_code(text)))
        assert used <= known, (name, sorted(used - known))


@pytest.mark.parametrize(("declared", "decode"), [
    (wire.RESERVE_REPLY, wire.decode_reserve), (wire.SETTLE_REPLY, wire.decode_settle)])
def test_decoders_read_the_fields_in_their_declared_order(declared: tuple[str, ...],
                                                          decode: object) -> None:
    values = [1, *range(101, 101 + len(declared) - 1), 7, 8]   # status 1, fields, one limit
    packed = wire.Format("reply", f"<q{len(values)}q", ()).pack(len(values), *values)
    decoded = decode(packed + b"tail")  # type: ignore[operator]
    assert [int(getattr(decoded, f)) for f in declared] == values[:len(declared)]
    assert list(decoded.limit_states) == [7, 8]


def test_lua_formats_describe_the_same_bytes_as_python() -> None:
    assert wire.SPEC.lua == "<c8BBddddd" and wire.SPEC.size == 50
    assert wire.RECORD.lua == "<c1" + "d" * 11 and wire.RECORD.size == 89
    assert wire.RESERVE_ARGS.lua == "<" + "d" * 12
    assert all(fmt.size == len(fmt.fields) * 8 for fmt in (wire.RESERVE_ARGS, wire.SETTLE_ARGS,
                                                           wire.CALENDAR_STARTS))


async def test_a_reserve_reply_means_what_its_fields_say(redis_client: Redis,
                                                         clock: Clock) -> None:
    engine = Engine.with_test_clock(BatchTransport(redis_client, None), clock)
    tokens = Limit("tokens_per_min", "user", "tokens", 1000, "sliding", window_ms=60_000)
    cap = Limit("requests_per_min", "user", "requests", 1, "sliding", window_ms=60_000)
    keys = [3, "rl:{user:u1}", "rl:{user:u1}:r:abcdefghijklmnopqrstuvwx", "rl:{user:u1}:alerts"]

    def args(output_cap: int) -> list[object]:
        return [*keys, wire.RESERVE_ARGS.pack(clock(), wire.ReserveMode.RESERVE, 300_000, 100,
                                              output_cap, 16, PRICES.input, PRICES.cached_input,
                                              PRICES.output, 12345, 300_000,
                                              wire.RESERVE_ARGS.size + 1) + b"[]",
                engine._specs_arg([tokens, cap])]

    granted = wire.decode_reserve(await engine.scripts.reserve(args(2000)))
    assert granted.status == wire.ReserveStatus.RESERVED
    assert granted.granted_output == 900                       # 1000 tokens - 100 input
    assert granted.expires_at_ms == clock() + 300_000
    assert granted.input_tokens == 100
    assert granted.reserved_cost_nano == -(-(100 * PRICES.input + 900 * PRICES.output) // 1000)
    assert (granted.denied_limit, granted.retry_after_ms) == (0, 0)
    assert list(granted.limit_states[0::2]) == [0, 0]           # remaining: tokens, requests

    keys[2] = "rl:{user:u1}:r:bbbbbbbbbbbbbbbbbbbbbbbb"
    denied = wire.decode_reserve(await engine.scripts.reserve(args(10)))
    assert denied.status == wire.ReserveStatus.DENIED
    assert denied.denied_limit == 1                            # tokens_per_min, 1-based
    assert 0 < denied.retry_after_ms <= 61_000
    assert denied.granted_output == 0


async def test_a_settle_reply_means_what_its_fields_say(redis_client: Redis,
                                                        clock: Clock) -> None:
    engine = Engine.with_test_clock(BatchTransport(redis_client, None), clock)
    lim = Limit("tokens_per_min", "user", "tokens", 10_000, "sliding", window_ms=60_000)
    res = await engine.reserve(ReserveRequest(tier_plan(lim), 100, 500, PRICES))
    rand = (await engine.ids()).parse(res.reservation_id)[0]  # type: ignore[index]
    reply = wire.decode_settle(await engine.scripts.settle([
        2, "rl:{user:u1}", f"rl:{{user:u1}}:r:{rand}",
        wire.SETTLE_ARGS.pack(clock(), wire.SettleMode.COMMIT, 100, 40, 50, 0, 300_000, 0)]))
    assert reply.status == wire.SettleStatus.APPLIED
    assert (reply.input_tokens, reply.cached_input_tokens, reply.output_tokens) == (100, 40, 50)
    assert reply.cost_nano == -(-(60 * PRICES.input + 40 * PRICES.cached_input
                                  + 50 * PRICES.output) // 1000)
    assert reply.reserved_tokens == 600
    assert reply.reserved_cost_nano == res.reserved_cost_nano
    assert reply.others == b"[]"
    again = wire.decode_settle(await engine.scripts.settle([
        2, "rl:{user:u1}", f"rl:{{user:u1}}:r:{rand}",
        wire.SETTLE_ARGS.pack(clock(), wire.SettleMode.RELEASE, 0, 0, 0, 0, 300_000, 0)]))
    assert again.status == wire.SettleStatus.CONFLICT
