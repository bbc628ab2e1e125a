"""What the quota engine is asked and answers: its requests, results and settings.

Plain values with no behaviour, so the HTTP and gRPC layers can build and read them without
the engine's Redis calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from ratelimitd.policy import AnomalyAction, Limit, Prices, Subject
from ratelimitd.quota.alert_record import Alert

SettleOutcome = Literal["applied", "duplicate", "not_found", "conflict"]


# Per-request values are plain (not frozen) dataclasses: a frozen one costs five times as much
# to build, and a reserve builds several.
@dataclass(slots=True)
class ReserveRequest:
    plan: Sequence[tuple[Subject, Sequence[Limit]]]
    input_tokens: int
    max_output_tokens: int
    prices: Prices
    min_output_tokens: int = 16
    idempotency_key: str | None = None
    dry_run: bool = False
    # subjects with no limits of their own whose blocks apply too (an api key, an ip): each is
    # asked in the same event-loop tick as the first subject, so it costs no round trip
    guards: Sequence[Subject] = ()
    # check the primary subject for anomalies (lua/anomaly.lua; the tier's `anomaly`): True
    # with AnomalySettings' action, an action of its own, or False (no check)
    anomaly: bool | AnomalyAction = False
    # per plan entry, the input tokens charged on that subject instead of input_tokens (the
    # gRPC service's per-descriptor hits); a commit applies the primary's usage to all
    subject_inputs: Sequence[int] | None = None
    # how long this reserve's records live (and it holds), ms, when not the engine's
    # reservation ttl plus commit grace: a charge never committed needs them only for
    # compensation and idempotent retries
    record_ttl_ms: int | None = None


@dataclass(slots=True)
class LimitState:
    limit: Limit
    subject: Subject
    remaining: int
    reset_ms: int
    over: bool = False      # a shadow limit this call left over its limit (it never denies)


@dataclass(slots=True)
class ReserveResult:
    allowed: bool
    reservation_id: str
    expires_at_ms: int
    input_tokens: int
    max_output_tokens: int
    states: list[LimitState]
    reserved_cost_nano: int = 0
    denied_by: LimitState | None = None
    retry_after_ms: int | None = None      # None: the call can never fit this limit
    duplicate: bool = False
    blocked: Blocked | None = None
    alerts: list[Alert] = field(default_factory=list)   # anomalies this reserve fired


@dataclass(slots=True)
class Blocked:
    """A subject of the reserve is blocked (abuse/blocks.py): until when, and why."""

    subject: Subject
    retry_after_ms: int
    reason: str


@dataclass(slots=True)
class SettleResult:
    status: SettleOutcome
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    cost_nano: int = 0
    reserved_tokens: int = 0
    reserved_cost_nano: int = 0
    # the cost alerts the commit fired (a repeat answers the same); a cost alert's `limit` is
    # the limit's lid: name it with LimitNames (the daemon knows its limits, the Lua does not)
    alerts: list[Alert] = field(default_factory=list)
    # with [redis] replicas_ack: whether the replicas acknowledged every subject's settle (a
    # settle they did not is applied all the same: WAIT never rolls back); None: not asked
    replicated: bool | None = None


@dataclass(frozen=True, slots=True)
class AnomalySettings:
    """[anomaly]: what makes a request or token spike and what a request spike does
    (lua/anomaly.lua)."""

    action: AnomalyAction = "alert"
    min_history_hours: int = 24
    request_spike_factor: float = 5.0
    token_spike_factor: float = 3.0
    block_ms: int = 900_000
    default_requests_per_hour: int = 10
    default_tokens_per_request: int = 500


@dataclass(frozen=True, slots=True)
class PeekResult:
    """A subject's limits as they stand (ReserveMode.PEEK): per limit, used and reset, and
    its block, if any."""

    used: list[int]
    reset_ms: list[int]
    block_reason: str | None
    block_ms_left: int


@dataclass(frozen=True, slots=True)
class EngineSettings:
    reservation_ttl_ms: int = 300_000
    # an unsettled record outlives its expiry by this much, so a late commit is still charged
    commit_grace_ms: int = 3_600_000
    timezone: str = "UTC"
    # [alerts] thresholds: fractions of every cost budget, each alerting once per period
    alert_thresholds: tuple[float, ...] = (0.5, 0.8, 1.0)
    anomaly: AnomalySettings = AnomalySettings()
