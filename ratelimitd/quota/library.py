"""Builds the Redis function library from the Lua sources (the top-level `lua/`, shipped inside
the package as `ratelimitd.lua`).

The library is wire.py's constants, then the shared files, then each entry script wrapped in
the function that registers it; it is loaded once with FUNCTION LOAD and each decision is one
FCALL. Unlike EVALSHA scripts, a library defines its helpers once, not on every call. Its name
carries a hash of the built source, so daemons of different versions can share one Redis during
a rolling upgrade.

The build writes each named integer constant as its number (see `inline_constants`) and keeps
a map from every built line to its source file and line (`Library.where`), so a Redis error
that names a line of the library can be reported at the line of the file that holds it.
`ratelimitd lua --show` prints the built library with that map.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Final

from ratelimitd.errors import RatelimitdError
from ratelimitd.quota.wire import lua_constants

# The library's files, in build order; the entry scripts become functions.
SHARED_FILES: Final = ("core", "sliding", "calendar", "bucket", "limits", "record", "block",
                        "alerts", "anomaly")
ENTRY_SCRIPTS: Final = ("reserve", "settle")
GENERATED: Final = "<wire.py>"

# `local NAME, ... = 1, ...`: the Lua's named integer constants, one declaration a line
_CONSTANTS: Final = re.compile(
    r"^local ([A-Z][A-Z0-9_]*(?:, [A-Z][A-Z0-9_]*)*) = (\d+(?:, \d+)*)\n", re.MULTILINE)
_LUA_STRING: Final = re.compile(r"('[^'\n]*'|\"[^\"\n]*\")")
_LONG_BRACKET: Final = re.compile(r"\[=*\[")
# Names a line binds: locals, function parameters, loop variables
_BINDINGS: Final = (
    re.compile(r"\blocal\s+function\s+\w+\s*\(([^)]*)\)"),
    re.compile(r"\bfunction\b[^(]*\(([^)]*)\)"),
    re.compile(r"\blocal\s+(?!function\b)([\w\s,]+?)(?:=|$)"),
    re.compile(r"\bfor\s+([\w\s,]+?)\s*(?:=|\bin\b)"),
)


class LuaBuildError(RatelimitdError, ValueError):
    """The Lua breaks a build rule; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Script:
    """One entry script, registered in the library as the function `function`."""

    name: str
    function: str


@dataclass(frozen=True, slots=True)
class _Part:
    file: str
    first_line: int       # its first line in the built library (1-based)
    lines: int


@dataclass(frozen=True, slots=True)
class Library:
    name: str
    source: str
    reserve: Script
    settle: Script
    parts: tuple[_Part, ...]

    @classmethod
    def build(cls, sources: dict[str, str] | None = None) -> Library:
        """The library from `sources` (file name -> Lua), by default the shipped files."""
        files = sources or read_sources()
        pieces: list[tuple[str, str]] = [(GENERATED, lua_constants())]
        pieces += [(f"{name}.lua", files[name]) for name in SHARED_FILES]
        digest = hashlib.sha1(  # noqa: S324 - a version tag, not a security boundary
            "\0".join(text for _, text in pieces + [(n, files[n]) for n in ENTRY_SCRIPTS])
            .encode()).hexdigest()[:12]
        name = f"ratelimitd_{digest}"
        scripts = {entry: Script(entry, f"{name}_{entry}") for entry in ENTRY_SCRIPTS}
        chunks, parts, line = [f"#!lua name={name}\n"], [], 2
        for file, text in pieces + [(f"{n}.lua", files[n]) for n in ENTRY_SCRIPTS]:
            entry = file.removesuffix(".lua")
            if entry in scripts:
                # the wrapper shares the body's first line, so the body's lines map 1:1
                text = (f"redis.register_function('{scripts[entry].function}', "
                        f"function(KEYS, ARGV) bind_globals() {text.rstrip()}\nend)\n")
            text = text if text.endswith("\n") else text + "\n"
            count = text.count("\n")
            parts.append(_Part(file, line, count))
            chunks.append(text)
            line += count
        located = tuple(parts)
        source = inline_constants("".join(chunks), lambda n: _where(located, n))
        return cls(name, source, scripts["reserve"], scripts["settle"], located)

    def where(self, line: int) -> str:
        """`file:line` of a line of the built library."""
        return _where(self.parts, line)

    def explain(self, message: str) -> str:
        """A Redis error message with each `user_function:LINE` given as file:line."""
        return re.sub(r"user_function:(\d+)",
                      lambda m: f"{m.group(0)} ({self.where(int(m.group(1)))})", message)

    def annotated(self) -> str:
        """The built library, each line prefixed with its source file and line."""
        lines = self.source.splitlines()
        width = max(len(self.where(i + 1)) for i in range(len(lines)))
        return "\n".join(f"{self.where(i + 1):<{width}}  {text}"
                         for i, text in enumerate(lines)) + "\n"


def _where(parts: tuple[_Part, ...], line: int) -> str:
    for part in parts:
        if part.first_line <= line < part.first_line + part.lines:
            return f"{part.file}:{line - part.first_line + 1}"
    return f"<library>:{line}"


def shared_script(body: str) -> str:
    """An EVAL script of the library's shared Lua (constants, helpers) and then `body`: runs
    one helper (e.g. alerts.lua's emit_alert) on its own, for tests and benchmarks."""
    files = read_sources()
    source = "".join([lua_constants(), *(files[name] + "\n" for name in SHARED_FILES),
                      "bind_globals()\n", body])
    return inline_constants(source)


def read_sources() -> dict[str, str]:
    """The shipped Lua files by name (without `.lua`)."""
    package = resources.files("ratelimitd.lua")
    return {name: (package / f"{name}.lua").read_text()
            for name in (*SHARED_FILES, *ENTRY_SCRIPTS)}


def inline_constants(source: str, where: Callable[[int], str] | None = None) -> str:
    """The Lua with its named integer constants written as numbers, their declarations
    commented out.

    Lua 5.1 reads a function's outer local (`lim[CAP]`) as an upvalue, one more instruction
    than a number (`lim[4]`), on every use, and a chunk may have at most 200 locals. Comments
    and string literals are left as they are. Raises LuaBuildError when the source breaks a
    rule of core.lua's header: a long bracket, a constant declared twice, or a constant name
    bound again as a local, parameter or loop variable.
    """
    locate = where or (lambda n: f"line {n}")
    values: dict[str, str] = {}
    for match in _CONSTANTS.finditer(source):
        names, numbers = match.group(1).split(", "), match.group(2).split(", ")
        if len(names) != len(numbers):
            raise LuaBuildError(f"{locate(_line_of(source, match.start()))}: "
                                f"{len(names)} names, {len(numbers)} values")
        for constant, number in zip(names, numbers, strict=True):
            if constant in values:
                raise LuaBuildError(f"{locate(_line_of(source, match.start()))}: constant "
                                    f"{constant} declared twice")
            values[constant] = number
    lines = []
    for number, line in enumerate(source.splitlines(keepends=True), start=1):
        code, dashes, comment = _split_comment(line)
        if _LONG_BRACKET.search(code) or (comment.startswith("[") and _LONG_BRACKET.match(
                comment)):
            raise LuaBuildError(f"{locate(number)}: long brackets ([[ ]]) are not allowed")
        if _CONSTANTS.match(line):
            lines.append("-- " + line)
            continue
        _refuse_shadowing(_LUA_STRING.sub("''", code), values, locate(number))
        if values:
            word = re.compile(r"\b(" + "|".join(sorted(values, key=len, reverse=True)) + r")\b")
            # odd pieces of the split are string literals
            code = "".join(piece if i % 2 else word.sub(lambda m: values[m.group(1)], piece)
                           for i, piece in enumerate(_LUA_STRING.split(code)))
        lines.append(code + dashes + comment)
    return "".join(lines)


def _line_of(source: str, offset: int) -> int:
    return source.count("\n", 0, offset) + 1


def _split_comment(line: str) -> tuple[str, str, str]:
    """code, '--' or '', the comment: the first `--` outside a string starts a comment."""
    pieces = _LUA_STRING.split(line)
    for i in range(0, len(pieces), 2):
        at = pieces[i].find("--")
        if at >= 0:
            code = "".join(pieces[:i]) + pieces[i][:at]
            return code, "--", pieces[i][at + 2:] + "".join(pieces[i + 1:])
    return line, "", ""


def _refuse_shadowing(code: str, constants: dict[str, str], place: str) -> None:
    for pattern in _BINDINGS:
        for match in pattern.finditer(code):
            for bound in re.findall(r"\w+", match.group(1)):
                if bound in constants:
                    raise LuaBuildError(f"{place}: {bound} is a constant; a local, parameter "
                                        "or loop variable may not reuse its name")
