"""User docs describe the code as it is: no history, no notes to developers, no references to
files or trackers outside the repository (history goes to CHANGELOG.md)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.docs.runner import PAGES, ROOT

FORBIDDEN = re.compile(
    r"this build|later build|to wire|\bdraft\b|the lead\b|(?<![\w-])(?-i:API\.md)|not supported yet"
    r"|\bissues?\s+#?\d+|\bfeat-[a-z]+|(?<![\w/&])#\d+\b",
    re.IGNORECASE)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_no_history_or_notes_to_developers(page: Path) -> None:
    found = [f"{page.name}:{n}: {m.group(0)!r}"
             for n, line in enumerate(page.read_text().splitlines(), 1)
             for m in FORBIDDEN.finditer(line)]
    assert not found, "\n".join(found)


def test_the_pattern_finds_what_it_is_for() -> None:
    for text in ("answered 400 in this build", "(to wire)", "# Operations (draft)",
                 "Integration (for the lead)", "see API.md", "issue 11 asked", "issues 8-15",
                 "fixed in #12", "on feat-opswire"):
        assert FORBIDDEN.search(text), text
    for text in ("a `#` comment", "`[redis] url`", "rsv_…", "&#123;"):
        assert not FORBIDDEN.search(text), text
