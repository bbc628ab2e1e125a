"""Units, in one home: money as integers, durations as milliseconds.

Money never is a float inside the daemon or in Redis:
- prices: integer micro-USD per 1M tokens (USD per 1M x 10^6);
- charges and budgets: integer nano-USD, so tokens x price / 1000 is nano-USD (the Lua rounds
  each charge up);
- USD floats appear only at the JSON edge (`nano_to_usd`) and in the TOML (`usd_to_nano`).
"""

from __future__ import annotations

from typing import Final

NANO_PER_USD: Final = 1_000_000_000
MICRO_PER_USD: Final = 1_000_000

MS_PER_UNIT: Final = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def usd_to_nano(usd: float) -> int:
    return round(usd * NANO_PER_USD)


def nano_to_usd(nano: int) -> float:
    return nano / NANO_PER_USD


def usd_to_micro(usd: float) -> int:
    """A price in USD per 1M tokens as micro-USD per 1M tokens."""
    return round(usd * MICRO_PER_USD)


def parse_duration(text: str) -> int:
    """'90s', '15m', '1h', '24h', '7d' -> milliseconds."""
    for suffix in ("ms", "s", "m", "h", "d"):
        number = text[: -len(suffix)]
        if text.endswith(suffix) and number.isdigit() and int(number) > 0:
            return int(number) * MS_PER_UNIT[suffix]
    raise ValueError(f"bad duration {text!r}: use a whole number with ms, s, m, h or d")


def format_duration(ms: int) -> str:
    """60000 -> '60s', 3600000 -> '1h', 86400000 -> '24h', as windows are usually written."""
    if ms % 3_600_000 == 0:
        return f"{ms // 3_600_000}h"
    if ms % 60_000 == 0 and ms > 60_000:
        return f"{ms // 60_000}m"
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    return f"{ms}ms"
