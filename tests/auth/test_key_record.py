"""A key's record as the scripts read it (record.py, lua/scripts/key_*.lua)."""

from __future__ import annotations

import re

import pytest

from ratelimitd.auth.keys.record import RECORD_FIELDS
from ratelimitd.quota.scripts import read_script


@pytest.mark.parametrize("script", ["key_read", "key_resolve"])
def test_the_scripts_read_a_record_in_the_order_python_decodes_it(script: str) -> None:
    [fields] = re.findall(r"'HMGET', KEYS\[1\], ([^)]*)\)", read_script(script))
    assert tuple(re.findall(r"'(\w+)'", fields)) == RECORD_FIELDS
