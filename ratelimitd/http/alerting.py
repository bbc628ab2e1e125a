"""Alerts on the daemon's side: naming what the Lua fired, handing it to webhook delivery, and
the budget warnings of a reserve.

The quota Lua decides every alert (lua/alerts.lua, lua/anomaly.lua) and returns it; it knows a
limit only by its lid, so `LimitNames` names cost alerts from the configuration (every tier's
limits, concurrency limits under the lid the engine derives for them). `forward` names the
alerts of a reply and hands them to `AlertService.submit`, which never waits or raises: a
decision is never delayed by delivery. The service runs for the app's lifetime
(`alerting_ctx`, appended to the app's cleanup_ctx after the services).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from ratelimitd.alerts import Alert, AlertService
from ratelimitd.errors import StoreUnavailable
from ratelimitd.http.app_keys import CONFIG, LIVE
from ratelimitd.policy import Limit, Tier
from ratelimitd.quota.calls import concurrency_lid
from ratelimitd.quota.model import LimitState, ReserveResult

log = logging.getLogger("ratelimitd.alerts")


class LimitNames:
    """lid -> the configured limit, over every tier."""

    def __init__(self, tiers: Mapping[str, Tier], reservation_ttl_ms: int) -> None:
        self._by_lid: dict[str, Limit] = {}
        for tier in tiers.values():
            for lim in tier.limits:
                self._by_lid.setdefault(lim.lid, lim)
                if lim.metric == "concurrent":
                    self._by_lid.setdefault(concurrency_lid(lim.lid, reservation_ttl_ms), lim)

    def limit(self, lid: str) -> Limit | None:
        return self._by_lid.get(lid)

    def name(self, alert: Alert) -> Alert:
        """The alert with its limit's name for the lid the Lua wrote (its id is unchanged: it
        is the deterministic id of that subject, limit, period and threshold)."""
        lim = self._by_lid.get(alert.limit) if alert.limit else None
        return dataclasses.replace(alert, limit=lim.name) if lim is not None else alert


@dataclass(frozen=True, slots=True)
class Alerting:
    service: AlertService
    names: LimitNames
    thresholds: tuple[float, ...]

    def forward(self, alerts: Iterable[Alert]) -> list[Alert]:
        """Names `alerts` and queues them for the webhooks; returns them named."""
        named = [self.names.name(a) for a in alerts]
        for alert in named:  # one line per alert (the Lua decides each once per period)
            log.warning("alert %s: %s %s", alert.kind, alert.scope, alert.limit or "-",
                        extra={"alert": alert.kind, "alert_id": alert.id,
                               "scope": alert.scope, "limit": alert.limit})
        if named:
            self.service.submit(named)
        return named


ALERTING: Final = web.AppKey("alerting", Alerting)


async def alerting_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    services = app[LIVE].services
    service = AlertService(services.store.client, config.alerts,
                           claim_idle_ms=config.alerts.claim_idle_ms)
    app[ALERTING] = Alerting(service, LimitNames(config.tiers, config.reservations.ttl_s * 1000),
                             tuple(sorted(config.alerts.thresholds)))
    await service.start()
    yield
    await service.aclose()


async def after_reserve(app: web.Application, result: ReserveResult) -> list[Alert]:
    """Forwards a reserve's anomaly alerts. A request spike this reserve decided blocked its
    subject in the Lua; the blocks index (`rlb:index`, another hash slot, so not writable from
    there in a cluster) lists it from here, as abuse/blocks.py lists the blocks scripts write."""
    alerts = app[ALERTING].forward(result.alerts)
    blocked = result.blocked
    if blocked is not None and any(a.kind == "request_spike" for a in alerts):
        ends = max(a.created_ms for a in alerts) + blocked.retry_after_ms
        log.warning("blocked %s for %d ms: request spike", blocked.subject.tag,
                    blocked.retry_after_ms, extra={"block": "anomaly"})
        try:
            await app[LIVE].services.access.blocks.index(blocked.subject, ends)
        except StoreUnavailable as exc:  # the block holds anyway; only its listing is missing
            log.warning("could not list the anomaly block of %s: %s", blocked.subject.tag,
                        type(exc).__name__)
    return alerts


def budget_warnings(states: Sequence[LimitState], thresholds: Sequence[float]
                    ) -> list[dict[str, Any]]:
    """A warning per cost budget at or past a threshold (the highest one it reached), from the
    limit states a reserve answers with (what is left after this reservation)."""
    warnings: list[dict[str, Any]] = []
    for state in states:
        lim = state.limit
        if lim.metric != "cost_usd" or lim.capacity <= 0:
            continue
        spent = (lim.capacity - state.remaining) / lim.capacity
        reached = [t for t in thresholds if spent >= t]
        if reached:
            percent = round(reached[-1] * 100)
            warnings.append({"code": f"budget_{percent}", "limit": lim.name,
                             "message": f"{percent}% of the {lim.window_text} budget "
                                        f"{lim.name} is spent"})
    return warnings
