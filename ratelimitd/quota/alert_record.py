"""The alert record: one dataclass, its encoding in Redis, and its JSON.

In Redis an alert is flat field/value pairs, every number an integer (money in nano-USD, the
threshold in parts per million), so Lua writes it without floats: an entry of the outbox
stream, and a JSON array of those strings in a subject's list of recent alerts (streams.py).
USD floats appear only in `Alert.to_json()`, the body a webhook receives and the form commit
answers and the usage API show. The encoding (version 1):

| field             | value                                                              |
|-------------------|--------------------------------------------------------------------|
| `v`               | `1`, the encoding version                                          |
| `id`              | the alert id (below)                                               |
| `kind`            | `cost_threshold`, `request_spike` or `token_spike`                 |
| `severity`        | `warning`, `critical`, `limit` (cost); `high`, `medium` (anomalies)|
| `scope`, `sid`    | the subject: scope (`user`, `org`...) and its id, unescaped         |
| `limit`           | the limit's name; empty for anomalies                              |
| `threshold_ppm`   | cost: the fraction of the budget x 10^6 (500000 is 50 %);          |
|                   | anomaly: the spike factor x 10^6 (5000000 is 5x)                   |
| `spend_nano`      | cost: the period's spend when it crossed, nano-USD; anomaly: 0      |
| `budget_nano`     | cost: the budget, nano-USD; anomaly: 0                             |
| `observed`        | anomaly: requests this hour, or tokens per request this hour; 0    |
| `baseline`        | anomaly: the subject's baseline of the same, rounded; 0            |
| `period_start_ms` | cost: start of the budget's period; anomaly: start of the hour     |
| `created_ms`      | when it fired, Redis time (`TIME`)                                 |

The alert id is deterministic, so every copy of one alert (a repeated commit, a re-forwarded
outbox entry, a retried POST) carries the same id and receivers can dedupe on it:
`"alt_" + sha1hex(kind "\\n" tag "\\n" limit "\\n" period_start_ms "\\n" threshold_ppm)[:24]`,
with `tag` the subject's hash tag (`policy.Subject.tag`, e.g. `user:u1`) and the numbers in
decimal; in Lua, `'alt_' .. redis.sha1hex(...):sub(1, 24)`. One subject, limit, period and
threshold is one alert, which is what "exactly once" promises.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from ratelimitd.errors import RatelimitdError
from ratelimitd.policy import Subject
from ratelimitd.units import NANO_PER_USD

ENCODING_VERSION: Final = 1
COST_SEVERITIES: Final = ("warning", "critical", "limit")
ANOMALY_SEVERITY: Final = {"request_spike": "high", "token_spike": "medium"}
# Every kind of alert with the severities it comes in: the one list that records are checked
# against and that the metrics' labels are made from
SEVERITIES: Final[dict[str, tuple[str, ...]]] = {
    "cost_threshold": COST_SEVERITIES,
    **{kind: (severity,) for kind, severity in ANOMALY_SEVERITY.items()}}
KINDS: Final = tuple(SEVERITIES)
PPM: Final = 1_000_000
# the stream fields, in the order they are written
FIELDS: Final = ("v", "id", "kind", "severity", "scope", "sid", "limit", "threshold_ppm",
                 "spend_nano", "budget_nano", "observed", "baseline", "period_start_ms",
                 "created_ms")
_INT_FIELDS: Final = ("threshold_ppm", "spend_nano", "budget_nano", "observed", "baseline",
                      "period_start_ms", "created_ms")


class AlertDecodeError(RatelimitdError, ValueError):
    """Fields that are not an alert of a known encoding."""


def severity_for(threshold: float) -> str:
    """A cost threshold's severity: 1.0 (the whole budget) is `limit`, from 0.8 `critical`,
    below `warning` (the defaults 0.5 / 0.8 / 1.0 map one to one)."""
    if threshold >= 1.0:
        return "limit"
    return "critical" if threshold >= 0.8 else "warning"


def threshold_ppm(fraction: float) -> int:
    return round(fraction * PPM)


def alert_id(kind: str, tag: str, limit: str, period_start_ms: int, threshold_ppm: int) -> str:
    """The deterministic id of module docstring; settle's Lua computes the same."""
    text = f"{kind}\n{tag}\n{limit}\n{period_start_ms}\n{threshold_ppm}"
    digest = hashlib.sha1(text.encode()).hexdigest()  # noqa: S324 - an id, not a secret
    return f"alt_{digest[:24]}"


@dataclass(frozen=True, slots=True)
class Alert:
    id: str
    kind: str
    severity: str
    scope: str
    subject_id: str
    limit: str                 # "" for anomalies
    threshold_ppm: int
    spend_nano: int
    budget_nano: int
    period_start_ms: int
    created_ms: int
    observed: int = 0
    baseline: int = 0

    @classmethod
    def cost_threshold(cls, subject: Subject, limit: str, threshold: float, spend_nano: int,
                       budget_nano: int, period_start_ms: int, created_ms: int) -> Alert:
        ppm = threshold_ppm(threshold)
        return cls(alert_id("cost_threshold", subject.tag, limit, period_start_ms, ppm),
                   "cost_threshold", severity_for(threshold), subject.scope, subject.id, limit,
                   ppm, spend_nano, budget_nano, period_start_ms, created_ms)

    @classmethod
    def anomaly(cls, kind: str, subject: Subject, factor: float, observed: int, baseline: int,
                hour_start_ms: int, created_ms: int) -> Alert:
        if kind not in ANOMALY_SEVERITY:
            raise ValueError(f"kind: {kind!r} is not an anomaly ({', '.join(ANOMALY_SEVERITY)})")
        ppm = threshold_ppm(factor)
        return cls(alert_id(kind, subject.tag, "", hour_start_ms, ppm), kind,
                   ANOMALY_SEVERITY[kind], subject.scope, subject.id, "", ppm, 0, 0,
                   hour_start_ms, created_ms, observed, baseline)

    @property
    def subject(self) -> Subject:
        return Subject(self.scope, self.subject_id)

    @property
    def threshold(self) -> float:
        return self.threshold_ppm / PPM

    def fields(self) -> list[str]:
        """The flat field/value pairs (an outbox entry's, XADD's tail)."""
        values = {"v": str(ENCODING_VERSION), "id": self.id, "kind": self.kind,
                  "severity": self.severity, "scope": self.scope, "sid": self.subject_id,
                  "limit": self.limit}
        values.update((name, str(getattr(self, name))) for name in _INT_FIELDS)
        return [item for name in FIELDS for item in (name, values[name])]

    def to_json(self) -> dict[str, Any]:
        """The JSON shape: webhook bodies, commit answers, the usage API. USD as floats."""
        cost = self.kind == "cost_threshold"
        return {
            "id": self.id, "version": ENCODING_VERSION, "kind": self.kind,
            "severity": self.severity, "subject": {"scope": self.scope, "id": self.subject_id},
            "limit": self.limit if cost else None, "threshold": self.threshold,
            "spend_usd": self.spend_nano / NANO_PER_USD if cost else None,
            "budget_usd": self.budget_nano / NANO_PER_USD if cost else None,
            "observed": None if cost else self.observed,
            "baseline": None if cost else self.baseline,
            "period_start_ms": self.period_start_ms, "created_ms": self.created_ms,
        }


def decode_alert(raw: Mapping[Any, Any] | Sequence[Any]) -> Alert:
    """An alert from its fields: a mapping (redis-py's XRANGE/XREADGROUP) or the flat
    field/value list a Lua reply or a subject's list carries. Raises AlertDecodeError on
    anything else."""
    fields = _as_text_map(raw)
    if fields.get("v") != str(ENCODING_VERSION):
        raise AlertDecodeError(f"unknown alert encoding version {fields.get('v')!r}")
    missing = [name for name in FIELDS if name not in fields]
    if missing:
        raise AlertDecodeError(f"alert entry lacks {', '.join(missing)}")
    kind, severity = fields["kind"], fields["severity"]
    if kind not in KINDS:
        raise AlertDecodeError(f"unknown alert kind {kind!r}")
    if severity not in SEVERITIES[kind]:
        raise AlertDecodeError(f"severity {severity!r} does not fit kind {kind!r}")
    try:
        numbers = {name: int(fields[name]) for name in _INT_FIELDS}
    except ValueError as exc:
        raise AlertDecodeError(f"alert entry has a field that is not an integer: {exc}") from exc
    return Alert(id=fields["id"], kind=kind, severity=severity, scope=fields["scope"],
                 subject_id=fields["sid"], limit=fields["limit"], **numbers)


def decode_alert_json(raw: bytes | str) -> Alert:
    """An alert from the JSON array of its field/value strings: an element of a subject's list,
    and what lua/alerts.lua's emit_alert returns for a script's reply. Raises AlertDecodeError."""
    try:
        fields = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise AlertDecodeError("an alert is a JSON array of field/value strings") from exc
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        raise AlertDecodeError("an alert is a JSON array of field/value strings")
    return decode_alert(fields)


def _as_text_map(raw: Mapping[Any, Any] | Sequence[Any]) -> dict[str, str]:
    if isinstance(raw, Mapping):
        items = list(raw.items())
    else:
        if len(raw) % 2:
            raise AlertDecodeError("alert fields come in field/value pairs")
        items = list(zip(raw[::2], raw[1::2], strict=True))
    try:
        return {_text(k): _text(v) for k, v in items}
    except UnicodeDecodeError as exc:
        raise AlertDecodeError("alert entry is not UTF-8") from exc


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
