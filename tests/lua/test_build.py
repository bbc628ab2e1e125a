"""How library.py builds the function library from lua/: the rules atop core.lua, enforced."""

from __future__ import annotations

import re

import pytest

from ratelimitd.quota.library import Library, LuaBuildError, inline_constants, read_sources
from ratelimitd.quota.runner import shipped_library


def test_named_constants_become_numbers_in_code_only() -> None:
    lua = ("local LID, CAP = 1, 4\n"
           "local function room(lim) return lim[CAP] - lim[5] end  -- lim[CAP] is the limit\n"
           "local why = 'CAP'\n")
    assert inline_constants(lua) == (
        "-- local LID, CAP = 1, 4\n"
        "local function room(lim) return lim[4] - lim[5] end  -- lim[CAP] is the limit\n"
        "local why = 'CAP'\n")


def test_a_constant_declared_twice_is_refused() -> None:
    with pytest.raises(LuaBuildError, match="CAP declared twice"):
        inline_constants("local CAP = 4\nlocal CAP, N = 5, 8\n")


@pytest.mark.parametrize("binding", [
    "local function f(lim, CAP) return lim end\n",
    "  local CAP = 7\n",
    "for CAP = 1, 3 do end\n",
    "for _, CAP in ipairs(t) do end\n",
    "local a, CAP = 1, 2 -- a comment\n",
])
def test_a_constant_bound_again_is_refused(binding: str) -> None:
    with pytest.raises(LuaBuildError, match="CAP is a constant"):
        inline_constants("local CAP = 4\n" + binding)


@pytest.mark.parametrize("text", ["local s = [[long\nstring]]\n", "--[[ a long\ncomment ]]\n",
                                  "local s = [==[x]==]\n"])
def test_long_brackets_are_refused(text: str) -> None:
    with pytest.raises(LuaBuildError, match="long brackets"):
        inline_constants("local CAP = 4\n" + text)


def test_an_error_names_the_source_file_and_line() -> None:
    sources = {**_shipped_sources(), "bucket": "local RATE = 8\nlocal function f(RATE) end\n"}
    with pytest.raises(LuaBuildError, match=r"^bucket\.lua:2: RATE is a constant"):
        Library.build(sources)


def test_every_built_line_maps_back_to_the_line_of_its_file() -> None:
    library = shipped_library()
    sources = _shipped_sources()
    built = library.source.splitlines()
    checked = 0
    for number, line in enumerate(built, start=1):
        file, _, at = library.where(number).partition(":")
        lines = sources.get(file.removesuffix(".lua"), "").splitlines()
        if int(at) <= len(lines):
            # the same line, but for constants written as numbers (or declarations commented
            # out) and the wrapper that opens an entry script
            assert _shape(line).endswith(_shape(lines[int(at) - 1])), (file, at)
            checked += 1
    assert checked == sum(len(text.splitlines()) for text in sources.values())


def test_a_redis_error_line_is_reported_at_its_source_line() -> None:
    library = shipped_library()
    line = next(i for i, text in enumerate(library.source.splitlines(), start=1)
                if "local function bucket_load" in text)
    explained = library.explain(f"ERR user_function:{line}: attempt to compare nil")
    assert f"user_function:{line} (bucket.lua:" in explained


def test_the_library_code_has_no_named_entry_left() -> None:
    code = "\n".join(line.partition("--")[0] for line in shipped_library().source.splitlines())
    for name in ("[CAP]", "[USED]", "[LID]", "== ALG_SLIDING", "[METRIC_COST_USD]",
                 "REPLY_STATUS]"):
        assert name not in code


def _shipped_sources() -> dict[str, str]:
    return read_sources()


def _shape(line: str) -> str:
    return re.sub(r"\b(?:[A-Z][A-Z0-9_]*|\d+)\b", "#", line.removeprefix("-- "))
