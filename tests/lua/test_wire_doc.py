"""docs/wire.md lists every packed field of wire.py at its offset: the page cannot go stale."""

from __future__ import annotations

import re
import struct
from pathlib import Path

from ratelimitd.quota import wire

DOC = (Path(__file__).resolve().parents[2] / "docs" / "wire.md").read_text()


def test_every_format_and_field_is_documented_at_its_offset() -> None:
    for fmt in wire.FORMATS:
        assert f"## {fmt.name} (`{fmt.python}`, {fmt.size} bytes)" in DOC, (
            f"{fmt.name}: run scripts/wire_doc.py")
        section = DOC.split(f"## {fmt.name} (")[1].split("\n## ")[0]
        items = [f"{n}s" if c == "s" else c
                 for n, c in re.findall(r"(\d*)([a-zA-Z])", fmt.python)
                 for _ in range(1 if c == "s" else int(n or 1))]
        offset = 0
        for field, item in zip(fmt.fields, items, strict=True):
            assert f"| {offset} | `{field}` | `{item}` |" in section, (fmt.name, field)
            offset += struct.calcsize("<" + item)
        assert offset == fmt.size


def test_every_reply_field_is_documented_at_its_position() -> None:
    for i, (reserve, settle) in enumerate(zip(wire.RESERVE_REPLY, wire.SETTLE_REPLY,
                                              strict=True), start=1):
        assert f"| {i} | `{reserve}` | `{settle}` |" in DOC
