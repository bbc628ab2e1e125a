"""The policy model, pure and without I/O: limits and tiers (limits.py), subjects and the plan
of a reserve (subjects.py), prices (pricing.py)."""

from ratelimitd.policy.limits import (
    ANOMALY_ACTIONS,
    BUILTIN_SCOPES,
    CALENDAR_PERIODS,
    DEFAULT_SUB_BUCKETS,
    METRICS,
    Algorithm,
    AnomalyAction,
    Limit,
    Metric,
    Tier,
    check_limits,
    default_tiers,
    shorthand_limits,
    sliding,
)
from ratelimitd.policy.pricing import (
    DEFAULT_MODEL_PRICE,
    DEFAULT_PRICES,
    ModelPrice,
    Prices,
    PriceTable,
)
from ratelimitd.policy.subjects import (
    Identity,
    PrefixLengths,
    Subject,
    ip_prefix,
    plan,
    subject_id,
)

__all__ = [
    "ANOMALY_ACTIONS",
    "BUILTIN_SCOPES",
    "CALENDAR_PERIODS",
    "DEFAULT_MODEL_PRICE",
    "DEFAULT_PRICES",
    "DEFAULT_SUB_BUCKETS",
    "METRICS",
    "Algorithm",
    "AnomalyAction",
    "Identity",
    "Limit",
    "Metric",
    "ModelPrice",
    "PrefixLengths",
    "PriceTable",
    "Prices",
    "Subject",
    "Tier",
    "check_limits",
    "default_tiers",
    "ip_prefix",
    "plan",
    "shorthand_limits",
    "sliding",
    "subject_id",
]
