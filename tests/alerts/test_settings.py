"""The backoff delivery retries with (settings.py): exponential, capped, half of it jitter."""

from __future__ import annotations

import random

from ratelimitd.alerts.settings import backoff_s


def test_the_backoff_doubles_up_to_its_cap_with_half_of_each_step_at_random() -> None:
    rng = random.Random(7)
    for attempt, step in [(1, 0.5), (2, 1.0), (3, 2.0), (10, 30.0), (1000, 30.0)]:
        waits = [backoff_s(attempt, 0.5, 30.0, rng) for _ in range(200)]
        assert all(step / 2 <= wait <= step for wait in waits), (attempt, min(waits), max(waits))
