"""One ShouldRateLimit call: its descriptors mapped onto the engine's subjects and limits, one
all-or-nothing reserve, and the answer Envoy expects.

Each descriptor that matches a rule is one subject (the domain and the descriptor's values, a
hash slot of its own) with that rule's limit, charged its hits as input tokens. Kinds of
descriptor:
  * plain (hits from the request's hits_addend, 1 when unset): reserved all or nothing;
  * usage (its own hits_addend > 0, as Envoy AI Gateway reports tokens when a stream is done):
    charged even past the limit (a shadow limit in the Lua), OVER_LIMIT when it left the limit
    over; the next request sees the overrun;
  * check (its own hits_addend = 0, AI Gateway's question as a request arrives): charges
    nothing, OVER_LIMIT when nothing of the limit is left (counted against the limit less one).
A rule in shadow mode (or every rule under [server] shadow_mode) is charged and reported but
always answers OK.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import orjson

from ratelimitd.config.envoy_rules import ENVOY_SCOPE, EnvoyRules, Match, Rule, rule_limit
from ratelimitd.policy import Limit, Prices, Subject
from ratelimitd.quota.engine import Engine
from ratelimitd.quota.model import LimitState, ReserveRequest, ReserveResult

# How long an Envoy charge's records live: long enough for the compensation of a request's
# earlier descriptors and for Envoy's retries of the call; nothing commits them later.
RECORD_TTL_MS: Final = 120_000
_NO_PRICES: Final = Prices(input=0, output=0, cached_input=0)
# envoyproxy/ratelimit's limit_remaining of an unlimited descriptor
UNLIMITED_REMAINING: Final = 2**32 - 1
_UNIT_OF_OVERRIDE: Final = {1: "second", 2: "minute", 3: "hour", 4: "day", 5: "month",
                            6: "year", 7: "week"}


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A request's descriptor as the decision needs it."""

    entries: tuple[tuple[str, str], ...]
    hits: int | None = None                         # its own hits_addend, when set
    override: tuple[int, int] | None = None         # its limit override: unit code, amount


@dataclass(slots=True)
class Status:
    """One descriptor's answer."""

    over: bool = False
    rule: Rule | None = None
    remaining: int = 0
    reset_ms: int = 0
    shadow_over: bool = False    # a shadow rule this call left over its limit


@dataclass(slots=True)
class Decision:
    over: bool
    statuses: list[Status]


@dataclass(slots=True)
class _Applied:
    index: int
    match: Match
    limit: Limit
    amount: int
    kind: str          # plain | usage | check
    shadow: bool


def decide_plan(rules: EnvoyRules, domain: str, descriptors: Sequence[Descriptor],
                request_hits: int, shadow_all: bool) -> tuple[list[Status], list[_Applied]]:
    """What each descriptor matches (after `replaces`), and what to charge."""
    statuses = [Status() for _ in descriptors]
    matches: list[tuple[int, Match]] = []
    for i, desc in enumerate(descriptors):
        match = _override(domain, desc) if desc.override else rules.match(domain, desc.entries)
        if match is not None:
            matches.append((i, match))
            statuses[i].rule = match.rule
    replaced = {name for _, m in matches for name in m.rule.replaces}
    applied: list[_Applied] = []
    for i, match in matches:
        rule = match.rule
        if rule.name and rule.name in replaced:
            statuses[i].rule = None
            continue
        if rule.limit is None:      # unlimited
            statuses[i].remaining = UNLIMITED_REMAINING
            continue
        own = descriptors[i].hits
        kind = "plain" if own is None else ("check" if own == 0 else "usage")
        amount = request_hits if own is None else own
        shadow = rule.shadow or shadow_all
        limit = rule.limit
        if kind == "check":
            limit = dataclasses.replace(limit, limit=limit.limit - 1)
        if kind == "usage" or shadow:
            limit = dataclasses.replace(limit, shadow=True)
        applied.append(_Applied(i, match, limit, amount, kind, shadow))
    return statuses, applied


def _override(domain: str, desc: Descriptor) -> Match | None:
    """A descriptor's own limit (Envoy's `limit` override) stands for a rule of its own."""
    assert desc.override is not None
    code, amount = desc.override
    unit = _UNIT_OF_OVERRIDE.get(code)
    if unit is None:
        return None
    path = domain + "." + ".".join(f"{k}_{v}" if v else k for k, v in desc.entries)
    rule = Rule(path, unit, amount, rule_limit(path, unit, amount))
    return Match(rule, (domain, *(f"{k}={v}" for k, v in desc.entries)))


async def decide(engine: Engine, rules: EnvoyRules, domain: str,
                 descriptors: Sequence[Descriptor], request_hits: int, shadow_all: bool,
                 call_id: tuple[str, ...] | None) -> Decision:
    """Charges every matched descriptor or none (a call that names itself, once: its retries
    answer what it answered); raises StoreUnavailable as the engine does."""
    statuses, applied = decide_plan(rules, domain, descriptors, request_hits, shadow_all)
    if not applied:
        return Decision(False, statuses)
    plan: list[tuple[Subject, list[Limit]]] = []
    amounts: list[int] = []
    where: dict[str, int] = {}
    for item in applied:
        subject = Subject(ENVOY_SCOPE, orjson.dumps(item.match.counter).decode())
        at = where.get(subject.tag)
        if at is None:      # the same descriptor twice in one request: one charge of both
            where[subject.tag] = len(plan)
            plan.append((subject, [item.limit]))
            amounts.append(item.amount)
        else:
            amounts[at] += item.amount
    result = await engine.reserve(ReserveRequest(
        plan, 0, 0, _NO_PRICES, min_output_tokens=0,
        idempotency_key=_key(call_id, domain, descriptors, request_hits),
        dry_run=not any(amounts), subject_inputs=amounts, record_ttl_ms=RECORD_TTL_MS))
    return _answer(result, statuses, applied)


def _key(call_id: tuple[str, ...] | None, domain: str, descriptors: Sequence[Descriptor],
         request_hits: int) -> str | None:
    """One key per call: its identity and its question (the check as a request arrives and
    the usage when its stream is done share the identity, not the question)."""
    if call_id is None:
        return None
    body = orjson.dumps([call_id, domain, request_hits,
                         [[d.entries, d.hits, d.override] for d in descriptors]])
    return hashlib.blake2b(body, digest_size=16).hexdigest()


def _answer(result: ReserveResult, statuses: list[Status], applied: list[_Applied]
            ) -> Decision:
    by_tag: dict[str, LimitState] = {s.subject.tag: s for s in result.states}
    denied_tag = result.denied_by.subject.tag if result.denied_by is not None else None
    over = not result.allowed
    for item in applied:
        status = statuses[item.index]
        tag = Subject(ENVOY_SCOPE, orjson.dumps(item.match.counter).decode()).tag
        state = by_tag.get(tag)
        if state is None:       # not reached: an earlier descriptor denied
            status.remaining = item.match.rule.requests_per_unit
            continue
        status.remaining = state.remaining + (1 if item.kind == "check" and result.allowed
                                              else 0)
        status.reset_ms = state.reset_ms
        if tag == denied_tag:
            status.over = True
            status.reset_ms = result.retry_after_ms or state.reset_ms
        elif state.over and item.shadow:
            status.shadow_over = not result.duplicate     # a retry's answer is not new
        elif state.over and item.kind == "usage":
            status.over = over = True
    return Decision(over, statuses)
