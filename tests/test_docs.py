"""The reference in docs/ stays complete: every configuration key and every error code the
code can answer is documented, and the README links the reference (not a file outside)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from ratelimitd.config.loader import _SECTIONS
from ratelimitd.errors import ERROR_CODES

ROOT = Path(__file__).resolve().parent.parent


def test_every_configuration_key_is_documented() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    for section, cls in _SECTIONS.items():
        assert f"[{section}]" in text, section
        for field in dataclasses.fields(cls):
            assert f"`{field.name}`" in text or f"`{section}.{field.name}`" in text, \
                f"{section}.{field.name}"


def test_every_error_code_is_in_the_one_list_and_documented_with_its_status() -> None:
    source = "\n".join(p.read_text() for p in (ROOT / "ratelimitd").rglob("*.py"))
    raised = set(re.findall(r'ApiError\(\s*(\d{3}),\s*"([a-z_]+)"', source))
    raised |= {(400, code) for code in re.findall(r'invalid\([^()]*?"([a-z_]+)"\)', source, re.S)}
    for status, code in raised:
        assert int(status) in ERROR_CODES.get(code, ()), code
    text = (ROOT / "docs" / "errors.md").read_text()
    documented = {(int(status), code)
                  for status, code in re.findall(r"^\| (\d{3}) \| `([a-z_]+)` \|", text, re.M)}
    assert documented == {(status, code) for code, statuses in ERROR_CODES.items()
                          for status in statuses}


def test_the_readme_links_the_reference_in_the_repository() -> None:
    readme = (ROOT / "README.md").read_text()
    for doc in ("docs/http-api.md", "docs/errors.md", "docs/configuration.md"):
        assert f"]({doc})" in readme and (ROOT / doc).is_file(), doc
    for target in re.findall(r"\]\(([^)#]+)", readme):
        assert target.startswith("http") or (ROOT / target).exists(), target
    assert len(readme.splitlines()) <= 120
