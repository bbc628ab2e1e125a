"""How scripts.py builds the function library from lua/."""

from __future__ import annotations

import pytest

from ratelimitd.scripts import Library, inline_constants


def test_named_constants_become_numbers_in_code_only() -> None:
    lua = ("local LID, CAP = 1, 4\n"
           "local function room(lim) return lim[CAP] - lim[5] end  -- lim[CAP] is the limit\n"
           "local why = 'CAP'\n")
    assert inline_constants(lua) == (
        "local LID, CAP = 1, 4\n"
        "local function room(lim) return lim[4] - lim[5] end  -- lim[CAP] is the limit\n"
        "local why = 'CAP'\n")


def test_a_constant_declared_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="CAP"):
        inline_constants("local CAP = 4\nlocal CAP, N = 5, 8\n")


def test_the_library_uses_no_slot_name_in_its_code() -> None:
    source = Library.from_lua().source
    code = "\n".join(line.partition("--")[0] for line in source.splitlines()
                     if not line.startswith("local "))
    for name in ("[CAP]", "[USED]", "[LID]", "== ALG_SLIDING", "[COST]"):
        assert name not in code
