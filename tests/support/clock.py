"""A test clock for engines built with Engine.with_test_clock."""

from __future__ import annotations


class Clock:
    """A test clock in ms that moves only when told: time without sleeping."""

    def __init__(self, start_ms: int = 1_764_000_000_000) -> None:
        self.now = start_ms

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms
