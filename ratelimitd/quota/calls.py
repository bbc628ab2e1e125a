"""How an engine call is spelled for the Lua (wire.py's formats): its keys, its limit specs and
anomaly arguments; and the alerts a reply carries."""

from __future__ import annotations

import hashlib

import orjson

from ratelimitd.policy import ANOMALY_ACTIONS, AnomalyAction, Limit
from ratelimitd.quota import wire
from ratelimitd.quota.alert_record import Alert, AlertDecodeError, decode_alert_json
from ratelimitd.quota.model import AnomalySettings


def call_keys(tag: str, rand: str) -> list[str | int]:
    """FCALL's numkeys and keys: the subject's limit state, its record of one reservation and
    its alert list, in one hash slot."""
    base = f"rl:{{{tag}}}"
    return [3, base, f"{base}:r:{rand}", f"{base}:alerts"]


def anomaly_args(anomaly: AnomalySettings) -> dict[bool | AnomalyAction, bytes]:
    def packed(action: AnomalyAction) -> bytes:
        return wire.ANOMALY_ARGS.pack(
            round(anomaly.request_spike_factor * wire.PPM),
            round(anomaly.token_spike_factor * wire.PPM), anomaly.block_ms,
            anomaly.default_requests_per_hour, anomaly.default_tokens_per_request,
            int(action == "block"), anomaly.min_history_hours)
    by_action: dict[bool | AnomalyAction, bytes] = {a: packed(a) for a in ANOMALY_ACTIONS}
    by_action[True] = by_action[anomaly.action]
    return by_action


def decode_alerts(raw: bytes) -> list[Alert]:
    """The alerts of a reply (a JSON array of alerts, each the JSON array of its fields)."""
    if not raw:
        return []
    alerts = []
    for fields in orjson.loads(raw):
        try:
            alerts.append(decode_alert_json(orjson.dumps(fields)))
        except AlertDecodeError:   # written by a newer version: its daemon forwards it
            continue
    return alerts


def concurrency_lid(lid: str, ttl_ms: int) -> str:
    """A concurrency limit's state id: its sub-buckets are as wide as a reservation lives, so
    daemons with different ttl_s must not share it."""
    return hashlib.blake2s(f"{lid}|{ttl_ms}".encode(), digest_size=4).hexdigest()


def encode_spec(lim: Limit, reservation_ttl_ms: int) -> bytes:
    """A limit's spec (wire.SPEC; a calendar limit's head only: its period starts change)."""
    lid = lim.lid
    algorithm = wire.ALGORITHM_CODES[lim.algorithm] + (wire.SHADOW_FLAG if lim.shadow else 0)
    if lim.algorithm == "calendar":
        head = (lid.encode(), algorithm, wire.METRIC_CODES[lim.metric])
        return wire.SPEC_HEAD.pack(*head, lim.limit)   # + the period starts, per call
    if lim.algorithm == "token_bucket":
        a, b = lim.window_ms, lim.burst
    elif lim.metric == "concurrent":
        # in-flight calls are a sliding window as long as a reservation lives
        a, b = reservation_ttl_ms, lim.buckets
        lid = concurrency_lid(lid, reservation_ttl_ms)
    else:
        a, b = lim.window_ms, lim.buckets
    head = (lid.encode(), algorithm, wire.METRIC_CODES[lim.metric])
    return wire.SPEC.pack(*head, lim.limit, a, b, 0, 0)
