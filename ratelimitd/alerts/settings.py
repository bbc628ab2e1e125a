"""What the two halves of alert delivery share (delivery.py forwards to the outbox,
webhook.py delivers it): the settings, the counters, the backoff and the pace of their logs."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

LOG_EVERY_S: Final = 30.0


def backoff_s(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: half the step for sure, half at random, so daemons
    that failed together do not retry together."""
    step = min(cap_s, base_s * 2.0 ** min(attempt - 1, 32))
    return step / 2 + rng.uniform(0, step / 2)


@dataclass(slots=True)
class AlertStats:
    """Counters of one AlertService (for logs and /metrics)."""

    submitted: int = 0          # alerts handed to submit()
    queue_full: int = 0         # dropped by submit(): the queue was full
    forwarded: int = 0          # appended to the outbox
    duplicates: int = 0         # forwarded before (a repeated commit): not appended again
    forward_errors: int = 0     # outbox appends that failed (Redis away), retried
    lost_on_shutdown: int = 0   # still queued when aclose() gave up on Redis
    delivered: int = 0          # POSTs answered 2xx
    failed_attempts: int = 0    # POSTs that failed and will be retried
    rejected: int = 0           # POSTs refused for good (400, 410, 413, 422)
    expired: int = 0            # older than delivery_max_age_s before delivered
    handed_over: int = 0        # claimed by another daemon while this one retried
    trimmed: int = 0            # pending entries the stream cap removed before delivery
    malformed: int = 0          # outbox entries that are not alerts
    redis_errors: int = 0       # delivery-side Redis calls that failed
    internal_errors: int = 0    # anything else that went wrong (a bug): logged, carried on


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """The knobs of delivery; from AlertsConfig, plus the timings tests shorten."""

    secret: bytes
    timeout_s: float
    retry_base_s: float
    retry_max_s: float
    max_age_ms: int
    claim_idle_ms: int
    poll_interval_s: float
    redis_timeout_s: float
