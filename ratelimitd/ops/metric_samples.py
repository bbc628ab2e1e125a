"""One process's metric values: a flat list of floats; a child is an index into it."""

from __future__ import annotations

import bisect
import os
from typing import Final

from ratelimitd.ops.metric_catalogue import Family

SEP: Final = "\x1f"  # joins a family name and label values into a file key (never in a value)


class Counter:
    """A pre-resolved counter child: an index into its process's list of values."""

    __slots__ = ("_index", "_values")

    def __init__(self, values: list[float], index: int) -> None:
        self._values = values
        self._index = index

    def inc(self, amount: float = 1.0) -> None:
        self._values[self._index] += amount


class Histogram:
    """A pre-resolved histogram child: per-bucket (not cumulative) counts, then the sum."""

    __slots__ = ("_base", "_bounds", "_sum", "_values")

    def __init__(self, values: list[float], base: int, bounds: tuple[float, ...]) -> None:
        self._values = values
        self._base = base
        self._bounds = bounds
        self._sum = base + len(bounds) + 1

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le is "less or equal")
        self._values[self._base + bisect.bisect_left(self._bounds, seconds)] += 1
        self._values[self._sum] += seconds


class Samples:
    """This process's values: one flat list, children are offsets into it."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self.offsets: dict[tuple[str, tuple[str, ...]], int] = {}
        self.widths: dict[str, int] = {}
        self.pid = os.getpid()

    def offset(self, family: Family, labels: tuple[str, ...]) -> int:
        key = (family.name, labels)
        found = self.offsets.get(key)
        if found is None:
            found = self.offsets[key] = len(self.values)
            self.widths[family.name] = family.width
            self.values.extend([0.0] * family.width)
        return found

    def counter(self, family: Family, labels: tuple[str, ...]) -> Counter:
        return Counter(self.values, self.offset(family, labels))

    def histogram(self, family: Family, labels: tuple[str, ...]) -> Histogram:
        return Histogram(self.values, self.offset(family, labels), family.buckets)

    def snapshot(self) -> dict[str, list[float]]:
        """Values by file key (family name and label values joined by SEP)."""
        return {SEP.join((name, *labels)): self.values[at:at + self.widths[name]]
                for (name, labels), at in self.offsets.items()}
