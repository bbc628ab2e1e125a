"""Reads TOML tables into the configuration's dataclasses, field by field from their type
hints; every mistake is a ConfigError naming the file and the dotted key (`Where`)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ratelimitd.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Where:
    """Where a value sits, for error messages: file and dotted key."""

    source: str
    key: str = ""

    def at(self, key: str) -> Where:
        return Where(self.source, f"{self.key}.{key}" if self.key else key)

    def error(self, problem: str) -> ConfigError:
        return ConfigProblem(f"{self.source}: {self.key or 'top level'}: {problem}", self.key)


class ConfigProblem(ConfigError):
    """One mistake, with the dotted key it is about (for its line in the file)."""

    def __init__(self, message: str, key: str, line: int = 0) -> None:
        super().__init__(message)
        self.key = key
        self.line = line   # in the file, once located (0: not known)


class ConfigProblems(ConfigError):
    """Every mistake found in a configuration, one per line of the message."""

    def __init__(self, problems: list[ConfigError]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass(slots=True)
class Problems:
    """Collects mistakes so a check reports all of them, not only the first."""

    found: list[ConfigError] = field(default_factory=list)

    @contextmanager
    def collect(self) -> Iterator[None]:
        """Runs a block; a ConfigError raised in it is kept instead of raised."""
        try:
            yield
        except ConfigProblems as exc:
            self.found.extend(exc.problems)
        except ConfigError as exc:
            self.found.append(exc)

    def raise_any(self) -> None:
        if len(self.found) == 1:
            raise self.found[0]
        if self.found:
            raise ConfigProblems(list(self.found))


def no_unknown(table: Mapping[str, Any], known: typing.Iterable[str], where: Where,
               what: str) -> None:
    """Every key of `table` that is not in `known`, each its own problem."""
    if not isinstance(table, Mapping):
        raise where.error(f"must be a table{what}")
    allowed = set(known)
    problems = Problems()
    for key in table:
        if key not in allowed:
            with problems.collect():
                raise where.at(key).error(f"unknown key (known: {', '.join(sorted(allowed))})")
    problems.raise_any()


def section(cls: type[Any], table: Any, where: Where, problems: Problems,
            choices: Mapping[str, tuple[str, ...]] | None = None) -> Any:
    """A section's dataclass from its table; `choices`: the allowed values of some keys.

    Each mistake is added to `problems`; the section keeps its valid keys (the others take
    their defaults), so the checks that span keys still see them."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    with problems.collect():
        no_unknown(table, fields, where, "")
    if not isinstance(table, Mapping):
        return cls()
    hints = typing.get_type_hints(cls)
    values = {}
    for key, raw in table.items():
        if key not in fields:
            continue
        with problems.collect():
            item = read_value(hints[key], raw, where.at(key))
            allowed = (choices or {}).get(key)
            if allowed and item not in allowed:
                raise where.at(key).error(f"must be one of {', '.join(allowed)}, not {item!r}")
            if isinstance(item, int | float) and not isinstance(item, bool) and item < 0:
                raise where.at(key).error("must not be negative")
            values[key] = item
    return cls(**values)


def read_value(hint: Any, raw: Any, where: Where) -> Any:
    """Checks a TOML value against a field's type; tuples come from arrays."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(raw, bool):
            raise where.error(f"must be true or false, not {raw!r}")
        return raw
    if hint is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise where.error(f"must be a whole number, not {raw!r}")
        return raw
    if hint is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise where.error(f"must be a number, not {raw!r}")
        return float(raw)
    if hint is str:
        if not isinstance(raw, str):
            raise where.error(f"must be a string, not {raw!r}")
        return raw
    if origin is tuple:
        if not isinstance(raw, list):
            raise where.error(f"must be an array, not {raw!r}")
        item = typing.get_args(hint)[0]
        return tuple(read_value(item, x, where.at(str(i))) for i, x in enumerate(raw))
    if origin in (Mapping, dict, typing.Mapping):
        if not isinstance(raw, Mapping):
            raise where.error(f"must be a table, not {raw!r}")
        item = typing.get_args(hint)[1]
        return {k: read_value(item, v, where.at(k)) for k, v in raw.items()}
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return read_value(inner[0], raw, where)
    raise where.error(f"unsupported setting type {hint!r}")  # pragma: no cover


