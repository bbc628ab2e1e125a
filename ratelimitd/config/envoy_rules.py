"""envoyproxy/ratelimit's YAML configuration, read as its README documents it, and the lookup
of the rule a request's descriptor matches.

A file holds one `domain` and a tree of `descriptors` (`key`, optional `value`, optional
`rate_limit`, nested `descriptors`). A descriptor of a request (a list of key/value entries)
walks the tree one entry per level, trying `key_value`, then a wildcard value (`value: foo*`,
a prefix), then `key` alone; the rule of the node its last entry reaches applies. Each rule
becomes one of our limits, counted in a sliding window of its unit (calendar `month` and
`year`), per distinct descriptor (its values), or shared by every value a wildcard matches
when the node says `share_threshold: true`.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from ratelimitd.errors import ConfigError
from ratelimitd.policy import Limit

# The scope of every rule's limit (its subject's id names the domain and the descriptor)
ENVOY_SCOPE: Final = "envoy"
# unit -> sliding window ms, or a calendar period
SLIDING_UNITS: Final = {"second": 1_000, "minute": 60_000, "hour": 3_600_000,
                        "day": 86_400_000, "week": 7 * 86_400_000}
CALENDAR_UNITS: Final = ("month", "year")
_ROOT_KEYS: Final = frozenset({"domain", "descriptors"})
_DESCRIPTOR_KEYS: Final = frozenset({"key", "value", "rate_limit", "descriptors", "shadow_mode",
                                     "detailed_metric", "share_threshold"})
_RATE_LIMIT_KEYS: Final = frozenset({"unit", "requests_per_unit", "unlimited", "name",
                                     "replaces"})
MAX_REQUESTS_PER_UNIT: Final = 2**32 - 1


@dataclass(frozen=True, slots=True)
class Rule:
    """A descriptor node's `rate_limit`. `limit` is None when unlimited."""

    path: str                       # domain.key_value.key… (the reference's full key)
    unit: str
    requests_per_unit: int
    limit: Limit | None
    name: str = ""
    replaces: tuple[str, ...] = ()
    shadow: bool = False
    detailed_metric: bool = False


@dataclass(slots=True)
class Node:
    """One level of a domain's descriptor tree."""

    rule: Rule | None = None
    share_threshold: bool = False
    children: dict[str, Node] = field(default_factory=dict)   # by "key" or "key_value"
    wildcards: list[tuple[str, str, Node]] = field(default_factory=list)  # key, prefix, node


@dataclass(frozen=True, slots=True)
class Match:
    """The rule a descriptor matches, and the id of its counter (domain and entries; a
    shared wildcard's pattern stands for the values it matches)."""

    rule: Rule
    counter: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class EnvoyRules:
    domains: Mapping[str, Node] = field(default_factory=dict)
    files: tuple[str, ...] = ()

    def match(self, domain: str, entries: Sequence[tuple[str, str]]) -> Match | None:
        """The rule the entries reach (all of them, one per level), or None."""
        node = self.domains.get(domain)
        if node is None or not entries:
            return None
        counter = [domain]
        last = len(entries) - 1
        for i, (key, value) in enumerate(entries):
            child, shown = _step(node, key, value)
            if child is None:
                return None
            counter.append(f"{key}={shown}")
            if i == last:
                return Match(child.rule, tuple(counter)) if child.rule is not None else None
            if not child.children and not child.wildcards:
                return None
            node = child
        return None

    def rule_names(self) -> set[str]:
        return {rule.path for rule in self.rules()}

    def rules(self) -> Iterator[Rule]:
        for node in self.domains.values():
            yield from _rules(node)


def _step(node: Node, key: str, value: str) -> tuple[Node | None, str]:
    """The child an entry leads to, and the value its counter shows."""
    child = node.children.get(f"{key}_{value}")
    if child is not None:
        return child, value
    for wkey, prefix, wild in node.wildcards:
        if wkey == key and value.startswith(prefix):
            return wild, f"{prefix}*" if wild.share_threshold else value
    return node.children.get(key), value


def _rules(node: Node) -> Iterable[Rule]:
    if node.rule is not None:
        yield node.rule
    for child in node.children.values():
        yield from _rules(child)


# -- loading ---------------------------------------------------------------------------------


class _Map(dict[str, Any]):
    """A YAML mapping that remembers its line."""

    line = 0


class _Loader(yaml.SafeLoader):  # type: ignore[misc]
    pass


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> _Map:
    data = _Map(loader.construct_mapping(node, deep=True))
    data.line = node.start_mark.line + 1
    return data


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)


def load_rules(patterns: Sequence[str], base: Path) -> EnvoyRules:
    """Loads every file the glob patterns name (relative to `base`); a pattern that names no
    file is an error (a typo would otherwise load no rules at all)."""
    domains: dict[str, Node] = {}
    files: list[str] = []
    for pattern in patterns:
        full = pattern if Path(pattern).is_absolute() else str(base / pattern)
        found = sorted(glob.glob(full))
        if not found:
            raise ConfigError(f"[envoy] config: {pattern!r} names no file (looked for {full})")
        for path in found:
            domain, node = _load_file(path)
            if domain in domains:
                raise ConfigError(f"{path}: domain {domain!r} is already defined by another "
                                  "file")
            domains[domain] = node
            files.append(path)
    return EnvoyRules(domains, tuple(files))


def _load_file(path: str) -> tuple[str, Node]:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}"
                          ) from exc
    try:
        root = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    where = _Where(path, "", 1)
    if not isinstance(root, _Map):
        raise where.error("must be a mapping with domain and descriptors")
    where = _Where(path, "", root.line)
    _no_unknown(root, _ROOT_KEYS, where)
    domain = root.get("domain")
    if not isinstance(domain, str) or not domain:
        raise where.error("needs a domain (a non-empty string)")
    node = Node()
    _load_descriptors(root.get("descriptors"), node, domain, path)
    return domain, node


@dataclass(frozen=True, slots=True)
class _Where:
    path: str
    descriptor: str
    line: int

    def error(self, message: str) -> ConfigError:
        at = f", descriptor {self.descriptor}" if self.descriptor else ""
        return ConfigError(f"{self.path}: line {self.line}{at}: {message}")


def _no_unknown(table: Mapping[str, Any], known: frozenset[str], where: _Where) -> None:
    for key in table:
        if key not in known:
            raise where.error(f"unknown key {key!r} (known: {', '.join(sorted(known))})")


def _load_descriptors(raw: Any, into: Node, parent: str, path: str) -> None:
    if raw is None:
        return
    if not isinstance(raw, list):
        raise _Where(path, parent, getattr(raw, "line", 1)).error(
            "descriptors must be a list of mappings")
    for item in raw:
        if not isinstance(item, _Map):
            raise _Where(path, parent, 1).error(f"a descriptor must be a mapping, not {item!r}")
        _load_descriptor(item, into, parent, path)


def _load_descriptor(item: _Map, into: Node, parent: str, path: str) -> None:
    key, value = item.get("key"), item.get("value", "")
    value = "" if value is None else value
    where = _Where(path, f"{parent}.{key}" if key else parent, item.line)
    _no_unknown(item, _DESCRIPTOR_KEYS, where)
    if not isinstance(key, str) or not key:
        raise where.error("a descriptor needs a key (a non-empty string)")
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise where.error(f"value must be a string, not {value!r}")
    value = str(value)
    composite = f"{key}_{value}" if value else key
    where = _Where(path, f"{parent}.{composite}", item.line)
    if composite in into.children or any(
            k == key and f"{p}*" == value for k, p, _ in into.wildcards):
        raise where.error(f"duplicate descriptor {composite!r} at this level")
    flags = {name: item.get(name, False) for name in
             ("shadow_mode", "detailed_metric", "share_threshold")}
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise where.error(f"{name} must be true or false, not {flag!r}")
    if flags["share_threshold"] and not value.endswith("*"):
        raise where.error("share_threshold needs a wildcard value (ending in '*')")
    node = Node(share_threshold=flags["share_threshold"])
    if "rate_limit" in item:
        node.rule = _rule(item["rate_limit"], where, flags["shadow_mode"],
                          flags["detailed_metric"])
    _load_descriptors(item.get("descriptors"), node, where.descriptor, path)
    if value.endswith("*"):
        into.wildcards.append((key, value[:-1], node))
    else:
        into.children[composite] = node


def _rule(raw: Any, where: _Where, shadow: bool, detailed: bool) -> Rule:
    if not isinstance(raw, _Map):
        raise where.error("rate_limit must be a mapping")
    where = _Where(where.path, where.descriptor, raw.line)
    _no_unknown(raw, _RATE_LIMIT_KEYS, where)
    unlimited = raw.get("unlimited", False)
    if not isinstance(unlimited, bool):
        raise where.error(f"unlimited must be true or false, not {unlimited!r}")
    name = raw.get("name", "") or ""
    if not isinstance(name, str):
        raise where.error(f"name must be a string, not {name!r}")
    replaces = _replaces(raw.get("replaces"), name, where)
    unit = raw.get("unit", "")
    unit = unit.lower() if isinstance(unit, str) else unit
    valid_unit = unit in SLIDING_UNITS or unit in CALENDAR_UNITS
    if unlimited:
        if valid_unit:
            raise where.error("an unlimited rate_limit takes no unit")
        return Rule(where.descriptor, "", 0, None, name, replaces, shadow, detailed)
    if not valid_unit:
        raise where.error(f"invalid unit {unit!r}: use one of "
                          f"{', '.join([*SLIDING_UNITS, *CALENDAR_UNITS])}")
    amount = raw.get("requests_per_unit", 0)
    if isinstance(amount, bool) or not isinstance(amount, int) or not (
            0 <= amount <= MAX_REQUESTS_PER_UNIT):
        raise where.error(f"requests_per_unit must be a whole number from 0 to "
                          f"{MAX_REQUESTS_PER_UNIT}, not {amount!r}")
    return Rule(where.descriptor, unit, amount, rule_limit(where.descriptor, unit, amount),
                name, replaces, shadow, detailed)


def _replaces(raw: Any, own: str, where: _Where) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise where.error("replaces must be a list of {name: …}")
    names = []
    for entry in raw:
        name = entry.get("name") if isinstance(entry, Mapping) else None
        if not isinstance(name, str) or not name:
            raise where.error("a replaces entry needs a name")
        if name == own:
            raise where.error("a rule cannot replace itself")
        names.append(name)
    return tuple(names)


def rule_limit(path: str, unit: str, amount: int) -> Limit:
    """The engine's limit of a rule: a request's hits are counted as its input tokens (each
    descriptor's own hits on its own subject), in the unit's sliding window or calendar
    period. The rule's path names the limit, so its state is its own."""
    if unit in CALENDAR_UNITS:
        return Limit(path, ENVOY_SCOPE, "input_tokens", amount, "calendar", period=unit)
    return Limit(path, ENVOY_SCOPE, "input_tokens", amount, "sliding",
                 window_ms=SLIDING_UNITS[unit])
