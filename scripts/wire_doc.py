"""Writes docs/wire.md from ratelimitd/quota/wire.py: `.venv/bin/python scripts/wire_doc.py`.

tests/lua/test_wire_doc.py fails when the page and wire.py disagree; this puts them back in
step. The field descriptions live here, beside the generator.
"""

from __future__ import annotations

import re
import struct
import textwrap
from pathlib import Path

from ratelimitd.quota import wire

DOC = Path(__file__).resolve().parent.parent / "docs" / "wire.md"


def _codes(pairs: object) -> str:
    return ", ".join(f"{k} {v}" for k, v in pairs)  # type: ignore[attr-defined]


UNITS = {
    "lid": "8 hex chars: the limit's id (changes when its state layout would)",
    "algorithm": "code: " + _codes(wire.ALGORITHM_CODES.items()),
    "metric": "code: " + _codes(wire.METRIC_CODES.items()),
    "limit": "in the metric's unit (cost: nano-USD); a token bucket's refill per window",
    "param_a": "sliding, bucket: window ms; calendar: previous period start ms",
    "param_b": "sliding: sub-buckets; bucket: burst; calendar: current period start ms",
    "param_c": "calendar: next period start ms; else 0",
    "param_d": "calendar: the period after next, start ms; else 0",
    "previous": "ms", "current": "ms", "next": "ms", "after_next": "ms",
    "clock_ms": "a test clock's ms; 0: Redis TIME",
    "mode": ("reserve: " + _codes((m.name, m.value) for m in wire.ReserveMode)
             + "; settle: " + _codes((m.name, m.value) for m in wire.SettleMode)),
    "ttl_ms": "the reservation's lifetime, ms",
    "input_tokens": "tokens", "output_cap": "tokens: the output cap asked for, or granted",
    "min_output": "tokens: the least output worth granting",
    "price_input": "micro-USD per 1M tokens", "price_cached_input": "micro-USD per 1M tokens",
    "price_output": "micro-USD per 1M tokens",
    "attempt": "a random whole number < 2^52 naming one reserve attempt (cancel: the attempt)",
    "record_ttl_ms": "how long the reservation record lives: the ttl plus the commit grace, ms",
    "others_at": "where the other subjects (JSON) start in the argument, 1-based; after the "
                 "ANOMALY_ARGS when there are any",
    "kept_ms": "how long a settled record is kept to answer repeats, ms",
    "lowest_threshold_ppm": "the lowest cost alert threshold x 10^6 (0: none); all of them, "
                            "ascending doubles, follow",
    "cached_input_tokens": "tokens", "output_tokens": "tokens (resize: the new output cap)",
    "newest_sub_bucket": "index: floor(ms / sub-bucket width)", "total": "the window's count",
    "newest_count": "the newest sub-bucket's count",
    "first": "calendar: period start ms; bucket: level",
    "second": "calendar: value; bucket: last refill ms",
    "value": "ms: the expiry the subject hash was last given (field `x`)",
    "state": (f"'{wire.RECORD_RESERVED}' reserved, '{wire.RECORD_COMMITTED}' committed, "
              f"'{wire.RECORD_RELEASED}' released or cancelled"),
    "expires_at_ms": "ms", "actual_input": "tokens (after a commit)",
    "actual_cached": "tokens", "actual_output": "tokens",
    "charged_limits": "n: how many limits the record charged (0 once settled)",
    "request_factor_ppm": "[anomaly] request_spike_factor x 10^6",
    "token_factor_ppm": "[anomaly] token_spike_factor x 10^6",
    "block_ms": "[anomaly] block_s x 1000",
    "default_requests_per_hour": "the baseline of a subject without history",
    "default_tokens_per_request": "the baseline of a subject without history",
    "request_spike_blocks": "1: a request spike blocks (action `block`); 0: it alerts",
    "min_history_hours": "active hours of baseline before any spike decision",
    "hour": "the hour the counts belong to: floor(ms / 3 600 000)",
    "requests": "reserves admitted this hour", "committed_requests": "commits this hour",
    "committed_tokens": "their tokens (input + output)",
    "baseline_requests": "moving average of requests per active hour",
    "baseline_tokens": "moving average of tokens per committed request",
    "hours_seen": "active hours folded into the baselines (at most 255)",
    "alerted": "bits: 1 request_spike, 2 token_spike alerted this hour",
    "period_start_ms": "ms: the period the marks belong to (calendar period, or window epoch)",
    "fired": "bits: threshold i (ascending) fired in that period",
}

HEAD = """# Wire formats

Every packed layout the engine's Python and Lua share, once. The source of truth is
`ratelimitd/quota/wire.py`: the build writes its codes, formats and reply fields into the Lua
as constants, and `tests/lua/test_contract.py` proves both sides agree on real Redis. This page
is written by `scripts/wire_doc.py`; `tests/lua/test_wire_doc.py` checks it lists every field
at its offset. All numbers are little-endian; `d` is a double (every integer the Lua sees is
exact below 2^53), `q` a signed 64-bit integer, `Ns` N bytes, `c` one byte.
"""

TAIL = """## Keys

- `rl:{<scope>:<id>}`: a subject's hash: one field per limit (`<lid>`), older sub-buckets
  (`<lid>:<i>`), `x` (`DOUBLE`, its expiry), `b` (a block: `DOUBLE` end, then the reason),
  `a` (`ALERT_MARK` per cost budget that alerted) and `n` (`ANOMALY_STATE`, a primary
  subject's). The hash tag is the subject, so every call touches one hash slot.
- `rl:{<scope>:<id>}:alerts`: the subject's recent alerts (a list, newest first, at most
  `ALERT_LIST_MAX_LEN`), pushed by the call that fired them.
- `rl:{<scope>:<id>}:r:<rand>`: a reservation record (`RECORD`, then one `d` per charged
  limit, the limits' `SPEC`s, the other subjects; once committed, a newline and the alerts
  the commit fired, comma-joined), beside its subject. It lives the
  reservation's ttl plus the commit grace; once settled, the ttl again (to answer repeats).
- `rl:{ratelimitd}:id-seal`: the secret every daemon seals reservation ids with.
"""


def render() -> str:
    out = [HEAD]
    for fmt in wire.FORMATS:
        out += [f"## {fmt.name} (`{fmt.python}`, {fmt.size} bytes)", "",
                "| offset | field | type | unit |", "|---|---|---|---|"]
        items = [f"{n}s" if c == "s" else c
                 for n, c in re.findall(r"(\d*)([a-zA-Z])", fmt.python)
                 for _ in range(1 if c == "s" else int(n or 1))]
        offset = 0
        for name, item in zip(fmt.fields, items, strict=True):
            out.append(f"| {offset} | `{name}` | `{item}` | {UNITS.get(name, '')} |")
            offset += struct.calcsize("<" + item)
        out.append("")
    out += ["## Replies", "",
            "A reply is `q` n, then n `q` numbers: the head's fields, then per limit `remaining`",
            "and `reset_ms` (0 for a concurrency limit: a slot frees when a call ends); after the",
            "numbers an opaque tail (reserve: a block's reason; settle: the JSON list of the",
            "reservation's other subjects), then from byte `alerts_at` of the tail the alerts",
            "the call fired: a JSON array of alerts, each the JSON array of its field/value",
            "strings (`ratelimitd/quota/alert_record.py`); nothing when none.",
            "", "| position | reserve (`RESERVE_REPLY`) | settle (`SETTLE_REPLY`) |",
            "|---|---|---|"]
    for i, (a, b) in enumerate(zip(wire.RESERVE_REPLY, wire.SETTLE_REPLY, strict=True), 1):
        out.append(f"| {i} | `{a}` | `{b}` |")
    out += ["", textwrap.fill("Reserve statuses: "
                              + _codes((s.name, s.value) for s in wire.ReserveStatus) + ".", 100),
            "Settle statuses: " + _codes((s.name, s.value) for s in wire.SettleStatus) + ".",
            "`denied_limit` is 1-based (0: none); `retry_after_ms` is -1 when the call can never",
            "fit.", "", TAIL]
    return "\n".join(out)


if __name__ == "__main__":
    DOC.write_text(render())
    print(f"wrote {DOC}")
