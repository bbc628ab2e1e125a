"""The contract between the engine's Python and its Lua, written once.

Every code, mode, status, packed format and reply field the two halves share is declared here.
library.py writes them into the Lua as named constants when it builds the function library
(`lua_constants()`), so the Lua names them and never spells a number or a format itself; the
engine packs and decodes with the same declarations. docs/wire.md describes each format's
fields; tests/lua/test_contract.py proves the halves agree on real Redis.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

# -- codes ----------------------------------------------------------------------------------

METRIC_CODES: Final = {
    "requests": 1, "tokens": 2, "input_tokens": 3, "output_tokens": 4, "cost_usd": 5,
    "concurrent": 6,
}
ALGORITHM_CODES: Final = {"sliding": 1, "calendar": 2, "token_bucket": 3}
# Added to a spec's algorithm code: a shadow limit, charged and reported like any other but
# never denying nor capping the grant; its remaining is reported unclamped (below 0: over).
SHADOW_FLAG: Final = 64


class ReserveMode(IntEnum):
    RESERVE = 1
    DRY_RUN = 2
    RETRY = 3          # an idempotent retry: a live record of the same id answers instead
    CONFIRM = 4        # a retry after REPEAT: is the first reserve's record here? charge nothing
    CHECK = 5          # only: is the subject blocked? (a subject with no limits of its own)
    ADOPT = 6          # a retry confirmed everywhere: take the record over (attempt := its own)
    PEEK = 7           # read-only: every limit's state as loaded, the block (usage API)


class SettleMode(IntEnum):
    COMMIT = 1
    RELEASE = 2
    RESIZE = 3         # a later subject granted less output: keep only the final grant
    CANCEL = 4         # a reserve attempt failed: refund it, or bar it if it has not run yet


class ReserveStatus(IntEnum):
    DENIED = 0
    RESERVED = 1
    REPEAT = 2         # the record of an earlier identical reserve answers
    DRY_RUN = 3
    CANCELLED = 4      # this attempt was cancelled before it ran: nothing charged
    MISSING = 5        # CONFIRM: no live record of the first reserve here
    BLOCKED = 6        # the subject is blocked: retry_after_ms until its end; the tail: reason
    PEEKED = 7         # PEEK: per limit what remains unclamped (used = limit - remaining);
                       # retry_after_ms: the block's ms left (0: none), the tail: its reason
    REUSED = 8         # RETRY: the id's live record is of another request (its idempotency
                       # key was used for other subjects or input tokens)


class SettleStatus(IntEnum):
    NOT_FOUND = 0
    APPLIED = 1
    DUPLICATE = 2      # a repeat of what is already done
    CONFLICT = 3       # already settled the other way


# -- packed formats ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Format:
    """One packed layout: Python's struct format, Lua's (its struct library spells a string
    field `cN` where Python spells `Ns`, and a 64-bit integer `l` where Python spells `q`),
    and the name of each field in order."""

    name: str
    python: str
    fields: tuple[str, ...]

    @property
    def lua(self) -> str:
        return _to_lua(self.python)

    @property
    def size(self) -> int:
        return struct.calcsize(self.python)

    def pack(self, *values: object) -> bytes:
        return struct.pack(self.python, *values)


def _to_lua(python: str) -> str:
    out, count = [], ""
    for char in python:
        if char.isdigit():
            count += char
            continue
        if char == "s":
            out.append(f"c{count}")
        elif char == "c":
            out.append("c1" * int(count or 1))
        else:
            out.append((char if char != "q" else "l") * int(count or 1))
        count = ""
    return "".join(out)


# A limit's spec, as the engine sends it (one per limit, concatenated). The four parameters:
# sliding: window ms, sub-buckets; token bucket: window ms, burst; calendar: the starts (ms)
# of the previous, current and next two periods (CALENDAR_STARTS, added per call).
SPEC: Final = Format("SPEC", "<8sBBddddd", (
    "lid", "algorithm", "metric", "limit", "param_a", "param_b", "param_c", "param_d"))
SPEC_HEAD: Final = Format("SPEC_HEAD", "<8sBBd", ("lid", "algorithm", "metric", "limit"))
CALENDAR_STARTS: Final = Format("CALENDAR_STARTS", "<dddd", (
    "previous", "current", "next", "after_next"))
# The numeric arguments of a call, packed (Lua parses a number from a string slowly), at the
# head of a call's first argument: Redis makes a Lua string and a table slot of each argument,
# so what varies per call travels in one (lua/reserve.lua and lua/settle.lua list what follows).
# clock_ms: a test clock's ms, 0 for Redis TIME; attempt: a random whole number below 2^53
# naming one reserve attempt, so that cancelling it is exact whatever runs first.
RESERVE_ARGS: Final = Format("RESERVE_ARGS", "<12d", (
    "clock_ms", "mode", "ttl_ms", "input_tokens", "output_cap", "min_output", "price_input",
    "price_cached_input", "price_output", "attempt", "record_ttl_ms", "others_at"))
SETTLE_ARGS: Final = Format("SETTLE_ARGS", "<8d", (
    "clock_ms", "mode", "input_tokens", "cached_input_tokens", "output_tokens", "attempt",
    "kept_ms", "lowest_threshold_ppm"))
# Limit state in the subject hash, one field per limit (see lua/sliding.lua and the others).
SLIDING_STATE: Final = Format("SLIDING_STATE", "<ddd", ("newest_sub_bucket", "total",
                                                        "newest_count"))
PAIR: Final = Format("PAIR", "<dd", ("first", "second"))
# The anomaly arguments of a reserve on its primary subject (lua/anomaly.lua), after its
# RESERVE_ARGS in the same argument (one argument less for Redis to make); none turns the check
# off (other subjects, tiers with `anomaly = false`). Factors are x 10^6, like thresholds.
# request_spike_blocks: 1 when a request spike blocks the subject, 0 when it only alerts.
ANOMALY_ARGS: Final = Format("ANOMALY_ARGS", "<7d", (
    "request_factor_ppm", "token_factor_ppm", "block_ms", "default_requests_per_hour",
    "default_tokens_per_request", "request_spike_blocks", "min_history_hours"))
# The subject hash's field `n` (lua/anomaly.lua): the current hour (its index since the epoch)
# and its counts, the baselines, how many active hours they have seen (counted up to 255), and
# which anomalies alerted this hour. Packed small: every busy subject holds one.
ANOMALY_STATE: Final = Format("ANOMALY_STATE", "<IIIdffBB", (
    "hour", "requests", "committed_requests", "committed_tokens",
    "baseline_requests", "baseline_tokens", "hours_seen", "alerted"))
# The subject hash's field `a` (lua/alerts.lua): one ALERT_MARK per cost limit that alerted:
# its lid, the period it alerted in, and a bit per threshold already fired in that period.
ALERT_MARK: Final = Format("ALERT_MARK", "<8sdd", ("lid", "period_start_ms", "fired"))
DOUBLE: Final = Format("DOUBLE", "<d", ("value",))
# A reservation record's head (lua/record.lua): then one double per charged limit (the
# sub-bucket or period it charged), the limits' specs, and the other subjects.
RECORD: Final = Format("RECORD", "<c11d", (
    "state", "expires_at_ms", "input_tokens", "output_cap", "price_input",
    "price_cached_input", "price_output", "actual_input", "actual_cached", "actual_output",
    "attempt", "charged_limits"))
# The states a record can be in (RECORD.state).
RECORD_RESERVED, RECORD_COMMITTED, RECORD_RELEASED = "r", "c", "x"

FORMATS: Final = (SPEC, SPEC_HEAD, CALENDAR_STARTS, RESERVE_ARGS, SETTLE_ARGS, SLIDING_STATE,
                  PAIR, ANOMALY_ARGS, ANOMALY_STATE, ALERT_MARK, DOUBLE, RECORD)
# A settled record keeps the alerts its commit fired after the other subjects, past this byte
# (JSON never holds a raw newline)
RECORD_ALERTS_SEPARATOR: Final = "\n"
# Thresholds and factors travel as parts per million
PPM: Final = 1_000_000
# A subject's alert list `rl:{<tag>}:alerts` (ratelimitd/alerts/streams.py): how many alerts it
# keeps, and how long it lives after its newest (past a month's budget period)
ALERT_LIST_MAX_LEN: Final = 20
ALERT_LIST_TTL_MS: Final = 40 * 86_400_000

# -- replies ----------------------------------------------------------------------------------
# A reply is a count n, then n signed 64-bit integers: the head's fields below, then per limit
# what remains and in how many ms it is full again; then an opaque tail (reserve: a block's
# reason; settle: the other subjects of the reservation) and, from byte `alerts_at` of the
# tail, the alerts the call fired (a JSON array of alerts, each the JSON array of its
# field/value strings, lua/alerts.lua; nothing when none).

RESERVE_REPLY: Final = ("status", "granted_output", "expires_at_ms", "denied_limit",
                        "retry_after_ms", "input_tokens", "reserved_cost_nano", "alerts_at")
SETTLE_REPLY: Final = ("status", "input_tokens", "cached_input_tokens", "output_tokens",
                       "cost_nano", "reserved_tokens", "reserved_cost_nano", "alerts_at")
REPLY_HEAD_SIZE: Final = len(RESERVE_REPLY)
_COUNT: Final = struct.Struct("<q")
# A reply's numbers by their count, compiled once up to this count (a head and 60 limits)
_UNPACKED_MAX: Final = REPLY_HEAD_SIZE + 2 * 60
_UNPACKERS: Final = tuple(struct.Struct(f"<{count}q").unpack_from
                          for count in range(_UNPACKED_MAX + 1))
_RESERVE_STATUSES: Final = {status.value: status for status in ReserveStatus}
_SETTLE_STATUSES: Final = {status.value: status for status in SettleStatus}


@dataclass(slots=True)
class ReserveReply:
    status: ReserveStatus
    granted_output: int
    expires_at_ms: int
    denied_limit: int            # 1-based index of the denying limit; 0: none
    retry_after_ms: int          # -1: the call can never fit the denying limit
    input_tokens: int
    reserved_cost_nano: int
    alerts_at: int               # where the tail's alerts start
    limit_states: Sequence[int]  # remaining, reset ms per limit
    tail: bytes                  # BLOCKED, PEEKED: the block's reason
    alerts: bytes                # JSON array of the alerts fired; b"" when none


@dataclass(slots=True)
class SettleReply:
    status: SettleStatus
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cost_nano: int
    reserved_tokens: int
    reserved_cost_nano: int
    alerts_at: int               # where the tail's alerts start
    limit_states: Sequence[int]  # a resize's limits: remaining, reset ms per limit
    others: bytes                # the reservation's other subjects (JSON list of tags)
    alerts: bytes                # JSON array of the alerts the commit fired; b"" when none


def _numbers(reply: bytes) -> tuple[tuple[int, ...], bytes]:
    (count,) = _COUNT.unpack_from(reply)
    numbers = (_UNPACKERS[count](reply, _COUNT.size) if 0 <= count <= _UNPACKED_MAX
               else struct.unpack_from(f"<{count}q", reply, _COUNT.size))
    return numbers, reply[_COUNT.size * (count + 1):]


# Replies are decoded on every call: a status is looked up (an enum call costs more than the
# rest of the decoding), and the replies are made positionally, in the order of their fields
# and of the numbers Redis sends.
def decode_reserve(reply: bytes) -> ReserveReply:
    n, tail = _numbers(reply)
    at = n[7]
    status = _RESERVE_STATUSES.get(n[0])
    return ReserveReply(ReserveStatus(n[0]) if status is None else status,
                        n[1], n[2], n[3], n[4], n[5], n[6], at,
                        n[REPLY_HEAD_SIZE:], tail[:at], tail[at:])


def decode_settle(reply: bytes) -> SettleReply:
    n, tail = _numbers(reply)
    at = n[7]
    status = _SETTLE_STATUSES.get(n[0])
    return SettleReply(SettleStatus(n[0]) if status is None else status,
                       n[1], n[2], n[3], n[4], n[5], n[6], at,
                       n[REPLY_HEAD_SIZE:], tail[:at], tail[at:])


# -- the Lua side -----------------------------------------------------------------------------


def lua_formats(formats: Iterable[Format]) -> str:
    """The Lua declarations of `formats` (NAME_FORMAT, NAME_SIZE), one a line."""
    return "".join(f"local {fmt.name}_FORMAT = '{fmt.lua}'\nlocal {fmt.name}_SIZE = {fmt.size}\n"
                   for fmt in formats)


def lua_constants() -> str:
    """The Lua declarations of everything above, for the head of the function library."""
    lines = ["-- generated from ratelimitd/quota/wire.py when the library is built"]

    def ints(pairs: Sequence[tuple[str, int]]) -> None:
        lines.append(f"local {', '.join(n for n, _ in pairs)} = "
                     f"{', '.join(str(v) for _, v in pairs)}")

    ints([(f"METRIC_{name.upper()}", code) for name, code in METRIC_CODES.items()])
    ints([(f"ALG_{name.upper()}", code) for name, code in ALGORITHM_CODES.items()])
    ints([("ALG_SHADOW_FLAG", SHADOW_FLAG)])
    for enum in (ReserveMode, SettleMode):
        ints([(f"MODE_{m.name}", m.value) for m in enum])
    ints([(f"RESERVE_{s.name}", s.value) for s in ReserveStatus])
    ints([(f"SETTLE_{s.name}", s.value) for s in SettleStatus])
    lines += lua_formats(FORMATS).splitlines()
    lines.append(f"local RECORD_RESERVED, RECORD_COMMITTED, RECORD_RELEASED = "
                 f"'{RECORD_RESERVED}', '{RECORD_COMMITTED}', '{RECORD_RELEASED}'")
    lines.append("local RECORD_ALERTS_SEPARATOR = '\\n'")
    ints([("PPM", PPM), ("ALERT_LIST_MAX_LEN", ALERT_LIST_MAX_LEN),
          ("ALERT_LIST_TTL_MS", ALERT_LIST_TTL_MS)])
    ints([(f"REPLY_{name.upper()}", i + 1) for i, name in enumerate(RESERVE_REPLY)])
    ints([(f"SETTLED_{name.upper()}", i + 1) for i, name in enumerate(SETTLE_REPLY)])
    ints([("REPLY_HEAD_SIZE", REPLY_HEAD_SIZE)])
    return "\n".join(lines) + "\n"
