"""Checks a Locust run from the daemon's answers: no subject passed a limit, attackers stopped.

Usage: python loadtests/verify.py --config FILE --answers FILE

The answers file is what loadtests/locustfile.py wrote: every reserve and commit with the client
time before sending (t0) and after the answer (t1). The daemon decided somewhere in between, by
Redis time on this same machine's clock.

- Sliding windows: a set of grants whose [t0, t1] all fall within less than one window length
  was decided within one window, so what it finally charged must fit the limit. What a grant
  finally charges (its commit's actual usage, else its reservation) never exceeds what it
  charged at any earlier moment (commits here are within the reservation), so the check is
  sound: it cannot accuse a daemon that kept the invariant, and it catches any over-admission
  among grants that close together.
- Calendar budgets: grants sent and answered on the same day (month) of the configured
  timezone add up to at most the budget.
- Concurrency: grants certainly in flight at one moment (from the reserve's answer to the
  commit's sending; never committed: until the reservation expires) number at most the limit.
- Attackers: the prompt bomb and the multi-account farm got denials (429, for the farm by an
  ip_prefix limit), credential stuffing failed (or was skipped in a build without keys), and
  no answer anywhere was a 5xx or a failed connection.

Exits 0 when all hold, 1 otherwise, printing every violation.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson

from ratelimitd.config import Config, load_config
from ratelimitd.policy import Limit, ip_prefix

NANO_PER_USD = 1_000_000_000


@dataclass
class Commit:
    t0: float
    status: int
    tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_nano: int = 0


@dataclass
class Grant:
    cls: str
    t0: float
    t1: float
    user: str
    tier: str
    ip: str | None
    tokens: int
    input_tokens: int
    max_output_tokens: int
    cost_nano: int
    remaining: list[float]
    commit: Commit | None = None

    def final(self, metric: str) -> int:
        """What this grant charges in the end on a limit of this metric."""
        done = self.commit if self.commit is not None and self.commit.status == 200 else None
        if metric == "requests":
            return 1
        if metric == "tokens":
            return done.tokens if done else self.tokens
        if metric == "input_tokens":
            return done.input_tokens if done else self.input_tokens
        if metric == "output_tokens":
            return done.output_tokens if done else self.max_output_tokens
        if metric == "cost_usd":
            return done.cost_nano if done else self.cost_nano
        raise ValueError(f"no final amount for metric {metric}")


@dataclass
class Report:
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: Counter[str] = field(default_factory=Counter)

    def fail(self, message: str) -> None:
        self.violations.append(message)


def usd_to_nano(usd: float) -> int:
    return round(usd * NANO_PER_USD)


def load_answers(path: Path) -> tuple[list[dict[str, Any]], list[Grant]]:
    entries = [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
    grants: dict[str, Grant] = {}
    for e in entries:
        if e["op"] == "reserve" and e["status"] == 200:
            grants[e["rid"]] = Grant(e["cls"], e["t0"], e["t1"], e["user"], e["tier"], e["ip"],
                                     e["tokens"], e["input_tokens"], e["max_output_tokens"],
                                     usd_to_nano(e["cost_usd"]), e["remaining"])
    for e in entries:
        if e["op"] == "commit" and e["rid"] in grants:
            grants[e["rid"]].commit = Commit(
                e["t0"], e["status"], e.get("tokens", 0), e.get("input_tokens", 0),
                e.get("output_tokens", 0), usd_to_nano(e.get("cost_usd", 0.0)))
    return entries, list(grants.values())


def subject_of(limit: Limit, grant: Grant) -> str | None:
    if limit.scope == "user":
        return grant.user
    if limit.scope == "ip":
        return grant.ip
    if limit.scope == "ip_prefix":
        return ip_prefix(grant.ip) if grant.ip else None
    if limit.scope == "global":
        return "*"
    return None  # org, key, other attributes: the load test sends none


def check_sliding(limit: Limit, subject: str, grants: Sequence[Grant], report: Report) -> None:
    window_s = limit.window_ms / 1000
    ordered = sorted(grants, key=lambda g: g.t0)
    for i, first in enumerate(ordered):
        horizon = first.t0 + window_s
        total = 0
        for later in ordered[i:]:
            if later.t0 >= horizon:
                break
            if later.t1 < horizon:
                total += later.final(limit.metric)
        report.checked["sliding windows"] += 1
        if total > limit.limit:
            report.fail(f"{limit.name} ({limit.scope} {subject}): {total} in one "
                        f"{window_s:g} s window, limit {limit.limit}")
            return


def check_calendar(limit: Limit, subject: str, grants: Sequence[Grant], zone: ZoneInfo,
                   report: Report) -> None:
    fmt = "%Y-%m-%d" if limit.period == "day" else "%Y-%m"
    totals: Counter[str] = Counter()
    for g in grants:
        start = datetime.fromtimestamp(g.t0, zone).strftime(fmt)
        if start == datetime.fromtimestamp(g.t1, zone).strftime(fmt):
            totals[start] += g.final(limit.metric)
    for period, total in totals.items():
        report.checked["calendar periods"] += 1
        if total > limit.limit:
            report.fail(f"{limit.name} ({limit.scope} {subject}): {total} on {period}, "
                        f"limit {limit.limit}")


def check_concurrent(limit: Limit, subject: str, grants: Sequence[Grant], ttl_s: int,
                     report: Report) -> None:
    edges: list[tuple[float, int]] = []
    for g in grants:
        done = g.commit is not None and g.commit.status == 200
        end = g.commit.t0 if done and g.commit is not None else g.t0 + ttl_s
        if end > g.t1:
            edges += [(g.t1, 1), (end, -1)]
    in_flight = peak = 0
    for _, step in sorted(edges, key=lambda edge: (edge[0], edge[1])):  # ends first
        in_flight += step
        peak = max(peak, in_flight)
    report.checked["concurrency sweeps"] += 1
    if peak > limit.limit:
        report.fail(f"{limit.name} ({limit.scope} {subject}): {peak} in flight at once, "
                    f"limit {limit.limit}")


def check_limits(config: Config, grants: Sequence[Grant], report: Report) -> None:
    zone = ZoneInfo(config.calendar.timezone)
    for tier in config.tiers.values():
        of_tier = [g for g in grants if g.tier == tier.name]
        for limit in tier.limits:
            by_subject: dict[str, list[Grant]] = defaultdict(list)
            for g in of_tier:
                subject = subject_of(limit, g)
                if subject is not None:
                    by_subject[subject].append(g)
            for subject, theirs in by_subject.items():
                if limit.metric == "concurrent":
                    check_concurrent(limit, subject, theirs, config.reservations.ttl_s, report)
                elif limit.algorithm == "sliding":
                    check_sliding(limit, subject, theirs, report)
                elif limit.algorithm == "calendar":
                    check_calendar(limit, subject, theirs, zone, report)
                else:
                    report.notes.append(f"{limit.name}: {limit.algorithm} limits are not "
                                        "checked by this verifier")
                    break
    for g in grants:
        if any(r < 0 for r in g.remaining):
            report.fail(f"a grant to {g.user} answered a negative remaining: {g.remaining}")


def check_attackers(config: Config, entries: Iterable[dict[str, Any]], grants: Sequence[Grant],
                    report: Report) -> dict[str, Counter[str]]:
    by_class: dict[str, Counter[str]] = defaultdict(Counter)
    ip_prefix_limits = {lim.name for tier in config.tiers.values() for lim in tier.limits
                        if lim.scope == "ip_prefix"}
    for e in entries:
        counts = by_class[e["cls"]]
        if e["op"] == "skipped":
            counts["skipped"] += 1
            continue
        status = e["status"]
        counts[f"{e['op']} {status}"] += 1
        if status == 0 or status >= 500:
            report.fail(f"{e['cls']}: {e['op']} answered {status or 'no connection'}")
        if e["op"] == "commit" and status != 200:
            report.fail(f"{e['cls']}: a commit answered {status}")
        if e["op"] == "reserve" and status == 429 and e.get("reason") in ip_prefix_limits:
            counts["denied by ip_prefix"] += 1
    bomb, farm = by_class["PromptBomb"], by_class["MultiAccount"]
    if not bomb["reserve 429"] or bomb["reserve 429"] <= bomb["reserve 200"]:
        report.fail(f"the prompt bomb was not stopped: {bomb['reserve 200']} grants, "
                    f"{bomb['reserve 429']} denials")
    if not farm["denied by ip_prefix"]:
        report.fail("the multi-account farm was never denied by an ip_prefix limit")
    stuffing = by_class["CredentialStuffing"]
    if stuffing["skipped"]:
        report.notes.append("credential stuffing: skipped (this build answers 400 to api_key)")
    elif stuffing["reserve 200"] or not stuffing["reserve 403"]:
        report.fail(f"credential stuffing was not stopped: {dict(stuffing)}")
    if not by_class["NormalGateway"]["reserve 200"]:
        report.fail("normal gateway traffic got no grant at all")
    if not grants:
        report.fail("no grant in the answers: did the load run?")
    return by_class


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--answers", required=True, type=Path)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    entries, grants = load_answers(args.answers)
    report = Report()
    check_limits(config, grants, report)
    by_class = check_attackers(config, entries, grants, report)
    print(f"{len(entries)} answers, {len(grants)} grants")
    for cls, counts in sorted(by_class.items()):
        print(f"  {cls:20} " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    print("checked: " + ", ".join(f"{v} {k}" for k, v in sorted(report.checked.items())))
    for note in report.notes:
        print(f"note: {note}")
    for violation in report.violations:
        print(f"VIOLATION: {violation}")
    print("FAIL" if report.violations else "PASS: no subject passed a limit; attackers stopped")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
