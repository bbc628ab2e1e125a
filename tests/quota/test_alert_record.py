"""The alert record: its stream encoding, its JSON, its id."""

from __future__ import annotations

import pytest

from ratelimitd.alerts import Alert, AlertDecodeError, alert_id, decode_alert, severity_for
from ratelimitd.policy import Subject
from ratelimitd.units import usd_to_nano

SUBJECT = Subject("user", "u{1}")


def cost_alert(threshold: float = 0.8) -> Alert:
    return Alert.cost_threshold(SUBJECT, "daily_budget_usd", threshold, usd_to_nano(0.81),
                                usd_to_nano(1.0), 1_764_028_800_000, 1_764_050_000_123)


def test_a_cost_alert_round_trips_through_its_stream_fields():
    alert = cost_alert()
    fields = alert.fields()
    as_redis_returns = {k.encode(): v.encode() for k, v in zip(fields[::2], fields[1::2])}

    assert decode_alert(as_redis_returns) == alert
    assert decode_alert([f.encode() for f in fields]) == alert  # a Lua reply's flat list
    assert all(v.lstrip("-").isdigit() for k, v in zip(fields[::2], fields[1::2])
               if k.endswith(("_ppm", "_nano", "_ms")))


def test_money_is_integer_nano_usd_in_redis_and_usd_in_json():
    alert = cost_alert()
    fields = dict(zip(alert.fields()[::2], alert.fields()[1::2]))
    assert fields["spend_nano"] == "810000000" and fields["budget_nano"] == "1000000000"
    assert fields["threshold_ppm"] == "800000"
    assert alert.to_json() == {
        "id": alert.id, "version": 1, "kind": "cost_threshold", "severity": "critical",
        "subject": {"scope": "user", "id": "u{1}"}, "limit": "daily_budget_usd",
        "threshold": 0.8, "spend_usd": 0.81, "budget_usd": 1.0, "observed": None,
        "baseline": None, "period_start_ms": 1_764_028_800_000,
        "created_ms": 1_764_050_000_123}


def test_default_thresholds_have_their_severities():
    assert [severity_for(t) for t in (0.5, 0.8, 1.0)] == ["warning", "critical", "limit"]
    assert severity_for(0.3) == "warning" and severity_for(0.95) == "critical"


def test_anomalies_have_their_severity_and_no_money():
    spike = Alert.anomaly("request_spike", SUBJECT, 5.0, observed=51, baseline=10,
                          hour_start_ms=1_764_046_800_000, created_ms=1_764_047_000_000)
    tokens = Alert.anomaly("token_spike", SUBJECT, 3.0, observed=1600, baseline=500,
                           hour_start_ms=1_764_046_800_000, created_ms=1_764_047_000_000)
    assert (spike.severity, tokens.severity) == ("high", "medium")
    assert decode_alert(spike.fields()) == spike
    body = spike.to_json()
    assert body["limit"] is None and body["spend_usd"] is None and body["threshold"] == 5.0
    assert (body["observed"], body["baseline"]) == (51, 10)
    with pytest.raises(ValueError, match="kind"):
        Alert.anomaly("cost_threshold", SUBJECT, 1.0, 0, 0, 0, 0)


def test_one_subject_limit_period_and_threshold_is_one_id():
    assert cost_alert().id == cost_alert().id
    ids = {cost_alert(0.5).id, cost_alert(0.8).id, cost_alert(1.0).id,
           Alert.cost_threshold(Subject("user", "u2"), "daily_budget_usd", 0.8, 0, 1, 1, 2).id,
           Alert.cost_threshold(SUBJECT, "daily_budget_usd", 0.8, 0, 1, 86_400_001, 2).id}
    assert len(ids) == 5
    assert cost_alert().id == alert_id("cost_threshold", SUBJECT.tag, "daily_budget_usd",
                                       1_764_028_800_000, 800_000)


async def test_the_lua_formula_of_the_id_gives_the_same_id(redis_client):
    text = f"cost_threshold\n{SUBJECT.tag}\ndaily_budget_usd\n1764028800000\n800000"
    lua_id = await redis_client.eval("return 'alt_' .. redis.sha1hex(ARGV[1]):sub(1, 24)", 0,
                                     text)
    assert lua_id.decode() == cost_alert().id


@pytest.mark.parametrize("change", [
    {"v": "2"}, {"kind": "budget_blown"}, {"severity": "high"}, {"spend_nano": "0.5"},
    {"created_ms": "soon"}])
def test_entries_that_are_not_alerts_are_refused(change):
    fields = dict(zip(cost_alert().fields()[::2], cost_alert().fields()[1::2]))
    fields.update(change)
    with pytest.raises(AlertDecodeError):
        decode_alert(fields)


def test_an_entry_missing_a_field_or_pairs_is_refused():
    fields = cost_alert().fields()
    without_budget = {k: v for k, v in zip(fields[::2], fields[1::2]) if k != "budget_nano"}
    with pytest.raises(AlertDecodeError, match="lacks budget_nano"):
        decode_alert(without_budget)
    with pytest.raises(AlertDecodeError, match="pairs"):
        decode_alert(fields[:-1])
