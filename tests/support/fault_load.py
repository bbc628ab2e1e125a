"""A gateway's load on two daemons' engines while Redis fails, and the books to check it by.

Workers reserve for users of two orgs (each reserve reaches user, org and global: three
subjects, so a fault can cut one short between them), commit half of what they are granted,
and retry what failed the way a gateway does: a reserve with an idempotency key is retried
with the same key, a commit until Redis takes it. The `Book` keeps every grant by reservation
id (a retry answering an earlier grant is the same grant) and what each grant must have
charged; `expected_used` is what every limit of every subject must count once Redis is back.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from ratelimitd.errors import ReserveInProgress, StoreUnavailable
from ratelimitd.policy import Identity, Limit, Subject, Tier, plan, sliding
from ratelimitd.quota.engine import Engine
from ratelimitd.quota.model import ReserveRequest
from tests.support.quota import PRICES, Plan, left

BIG = 10**9
# o2's members share 60 requests: their org denies, so reserves are undone there too
TIGHT_ORG_REQUESTS = 60


def _tier(name: str, org_requests: int) -> Tier:
    return Tier(name, (
        sliding("user_rq", "requests", "1h", BIG),
        sliding("user_tok", "tokens", "1h", BIG),
        Limit("user_conc", "user", "concurrent", BIG, "sliding"),
        sliding("org_rq", "requests", "1h", org_requests, scope="org"),
        sliding("org_tok", "tokens", "1h", BIG, scope="org"),
        sliding("global_rq", "requests", "1h", BIG, scope="global"),
    ))


def plans(users: list[str]) -> list[Plan]:
    """Plans of user, org and global: even users in o1 (ample), odd ones in o2 (tight)."""
    out: list[Plan] = []
    for k, user in enumerate(users):
        tier = _tier("ample", BIG) if k % 2 == 0 else _tier("tight", TIGHT_ORG_REQUESTS)
        out.append([(s, list(lims)) for s, lims in
                    plan(tier, Identity(user, tier.name, org="o1" if k % 2 == 0 else "o2"))])
    return out


@dataclass
class Grant:
    plan: Plan
    input: int
    granted: int
    committed: int | None = None          # output tokens committed, once Redis took it


@dataclass
class Book:
    grants: dict[str, Grant] = field(default_factory=dict)
    failed_reserves: int = 0
    in_progress: int = 0
    denied: int = 0
    failed_commits: list[tuple[str, int, int]] = field(default_factory=list)

    def grant(self, rid: str, p: Plan, inp: int, granted: int) -> Grant:
        return self.grants.setdefault(rid, Grant(p, inp, granted))

    def expected_used(self) -> dict[tuple[str, str], int]:
        """(subject tag, limit name) -> what the limit must count: each grant's request,
        tokens (the estimate, or the committed usage) and, while uncommitted, its slot."""
        used: dict[tuple[str, str], int] = {}
        for g in self.grants.values():
            tokens = g.input + (g.granted if g.committed is None else g.committed)
            for subject, limits in g.plan:
                for lim in limits:
                    amount = {"requests": 1, "tokens": tokens,
                              "concurrent": int(g.committed is None)}[lim.metric]
                    key = (subject.tag, lim.name)
                    used[key] = used.get(key, 0) + amount
        return used


async def gateway(engine: Engine, all_plans: list[Plan], book: Book, stop: asyncio.Event,
                  rng: random.Random) -> None:
    """One gateway worker: reserve, commit half, retry what failed."""
    while not stop.is_set():
        p = rng.choice(all_plans)
        inp, cap = rng.randint(1, 400), rng.randint(16, 600)
        key = f"k{rng.getrandbits(64)}" if rng.random() < 0.5 else None
        for _ in range(6 if key else 1):
            try:
                res = await engine.reserve(ReserveRequest(p, inp, cap, PRICES,
                                                          idempotency_key=key))
            except StoreUnavailable:
                book.failed_reserves += 1
                await asyncio.sleep(0.02)
                continue
            except ReserveInProgress:
                book.in_progress += 1
                await asyncio.sleep(0.05)
                continue
            if not res.allowed:
                book.denied += 1
            else:
                grant = book.grant(res.reservation_id, p, inp, res.max_output_tokens)
                if rng.random() < 0.5 and grant.committed is None:
                    await commit(engine, book, res.reservation_id, grant, inp,
                                 res.max_output_tokens // 2)
            break
        await asyncio.sleep(0.002)


async def commit(engine: Engine, book: Book, rid: str, grant: Grant, inp: int,
                 out: int) -> None:
    try:
        done = await engine.commit(rid, inp, out)
    except StoreUnavailable:
        book.failed_commits.append((rid, inp, out))
        return
    assert done.status in ("applied", "duplicate"), done
    grant.committed = out


async def settle_leftovers(engine: Engine, book: Book, timeout_s: float) -> None:
    """Commits that failed, retried until Redis takes them (a gateway retries a commit)."""
    deadline = time.monotonic() + timeout_s
    todo, book.failed_commits = book.failed_commits, []
    for rid, inp, out in todo:
        while True:
            try:
                done = await engine.commit(rid, inp, out)
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "Redis did not take a commit in time"
                await asyncio.sleep(0.05)
        assert done.status in ("applied", "duplicate"), (rid, done)
        book.grants[rid].committed = out


async def drained(engines: list[Engine], timeout_s: float) -> None:
    """Until no engine has a cancel waiting to reach Redis (bounded)."""
    deadline = time.monotonic() + timeout_s
    while any(e.compensator.pending for e in engines):
        waiting = sum(len(e.compensator.pending) for e in engines)
        assert time.monotonic() < deadline, f"{waiting} cancels still pending after {timeout_s}s"
        await asyncio.sleep(0.05)
    assert all(e.compensator.dropped == 0 for e in engines)


async def counted(engine: Engine, all_plans: list[Plan]) -> dict[tuple[str, str], int]:
    """(subject tag, limit name) -> what Redis counts, read with dry runs."""
    used: dict[tuple[str, str], int] = {}
    seen: set[str] = set()
    for p in all_plans:
        for subject, limits in p:
            if subject.tag in seen:
                continue
            seen.add(subject.tag)
            remaining = await left(engine, [(subject, limits)])
            for lim in limits:
                used[(subject.tag, lim.name)] = lim.limit - remaining[
                    f"{subject.scope}:{lim.name}"]
    return used


def tags(all_plans: list[Plan]) -> set[str]:
    return {s.tag for p in all_plans for s, _ in p}


def subject_of(all_plans: list[Plan], scope: str) -> Subject:
    return next(s for p in all_plans for s, _ in p if s.scope == scope)
