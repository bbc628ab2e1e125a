"""`ratelimitd usage SCOPE ID`: a subject's usage as a table, from a running daemon.

It asks the daemon's `GET /v1/admin/usage` (so it shows exactly what the API answers) and
prints each limit's used, limit, remaining and reset, then the subject's block and recent
alerts (times in ISO 8601 UTC). It needs only the daemon's URL and an admin token: `--url`,
else $RATELIMITD_URL, else the first TCP address the configuration (`--config` or
$RATELIMITD_CONFIG) listens on; `--admin-token`, else $RATELIMITD_ADMIN_TOKEN, else the
configuration's first admin token (never echoed).
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Final

import orjson

from ratelimitd.cli.admin import iso_utc
from ratelimitd.config import Config, load_config, resolve_tokens
from ratelimitd.config.reader import Where
from ratelimitd.errors import ConfigError, RatelimitdError

DEFAULT_URL: Final = "http://127.0.0.1:8080"
TOKEN_ENV: Final = "RATELIMITD_ADMIN_TOKEN"  # noqa: S105 - the variable's name, not a secret
TIMEOUT_S: Final = 10.0
MAX_ANSWER_BYTES: Final = 4 * 1024 * 1024


def add_parser(commands: Any) -> None:
    usage = commands.add_parser("usage", help="a subject's usage, alerts and block")
    usage.add_argument("scope", help="user, org, key, ip, ip_prefix, global or an attribute")
    usage.add_argument("id", help="the subject's id")
    usage.add_argument("--tier", help="only this tier's limits")
    usage.add_argument("--url", default=os.environ.get("RATELIMITD_URL"),
                       help="the daemon (default: $RATELIMITD_URL, else the configuration's "
                            f"listen address, else {DEFAULT_URL})")
    usage.add_argument("--admin-token", default=None,
                       help=f"an admin token (default: ${TOKEN_ENV}, else the "
                            "configuration's first admin_tokens)")
    usage.add_argument("--config", default=os.environ.get("RATELIMITD_CONFIG"), metavar="PATH",
                       help="the daemon's TOML file (default: $RATELIMITD_CONFIG)")


class UsageError(RatelimitdError):
    """The daemon could not be asked, or refused: the message says why."""


def fetch_usage(url: str, token: str, scope: str, ident: str, tier: str | None = None
                ) -> dict[str, Any]:
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise UsageError(f"--url must be http:// or https://, not {url!r}")
    query = {"scope": scope, "id": ident, **({"tier": tier} if tier else {})}
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked above
        f"{url.rstrip('/')}/v1/admin/usage?{urllib.parse.urlencode(query)}",
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as answer:  # noqa: S310
            return dict(orjson.loads(answer.read(MAX_ANSWER_BYTES)))
    except urllib.error.HTTPError as exc:
        try:
            error = orjson.loads(exc.read(MAX_ANSWER_BYTES))["error"]
            raise UsageError(f"HTTP {exc.code} {error['code']}: {error['message']}") from exc
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise UsageError(f"HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise UsageError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from exc


def _amount(value: Any, metric: str) -> str:
    return f"${value:,.4f}" if metric == "cost_usd" else f"{value:,}"


def _reset(ms: int) -> str:
    seconds = -(-ms // 1000)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def render_usage(data: dict[str, Any]) -> str:
    """The answer as a table, then the block and the alerts."""
    subject = data["subject"]
    rows = [("limit", "metric", "window", "used", "limit", "remaining", "reset", "tiers")]
    for lim in data["limits"]:
        metric = lim["metric"]
        rows.append((lim["name"], metric, lim["window"] or "-", _amount(lim["used"], metric),
                     _amount(lim["limit"], metric), _amount(lim["remaining"], metric),
                     _reset(lim["reset_ms"]), ",".join(lim["tiers"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"{subject['scope']} {subject['id']}"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
              for row in rows]
    if len(rows) == 1:
        lines.append("(no limits of this scope)")
    block = data.get("block")
    lines.append(f"blocked: {block['reason']} for {_reset(block['retry_after_ms'])} more "
                 f"(until {iso_utc(block['expires_at_ms'])})" if block else "blocked: no")
    alerts = data.get("alerts") or []
    lines.append(f"recent alerts: {len(alerts)}")
    for alert in alerts:
        what = (f"{alert['limit']} at {round(alert['threshold'] * 100)}%: "
                f"${alert['spend_usd']:,.4f} of ${alert['budget_usd']:,.4f}"
                if alert["kind"] == "cost_threshold"
                else f"{alert['observed']} against a baseline of {alert['baseline']}")
        lines.append(f"  {iso_utc(alert['created_ms'])}  {alert['severity']:<8}  "
                     f"{alert['kind']}  {what}")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    try:
        url, token = _daemon(args)
    except ConfigError as exc:
        print(f"ratelimitd usage: {exc}", file=sys.stderr)
        return 2
    try:
        data = fetch_usage(url, token, args.scope, args.id, args.tier)
    except UsageError as exc:
        print(f"ratelimitd usage: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(render_usage(data))
    return 0


def _daemon(args: argparse.Namespace) -> tuple[str, str]:
    """The daemon's URL and an admin token, from the flags, the environment or the
    configuration (read only when one of them is missing)."""
    url, token = args.url, args.admin_token or os.environ.get(TOKEN_ENV, "")
    config = (load_config(args.config, secrets=False) if args.config and not (url and token)
              else None)
    if not token:
        if config is None or not config.server.admin_tokens:
            where = args.config or "--config FILE (or $RATELIMITD_CONFIG)"
            raise ConfigError(f"an admin token is needed: --admin-token, ${TOKEN_ENV}, or "
                              f"[server] admin_tokens in {where}")
        first = resolve_tokens(config.server.admin_tokens[:1],
                               Where(config.source, "server.admin_tokens.0"))
        token = first[0].decode("utf-8", "surrogateescape")
    return url or (_listen_url(config) if config is not None else DEFAULT_URL), token


def _listen_url(config: Config) -> str:
    """http:// of the first TCP address the daemon listens on (a wildcard as loopback)."""
    for address in config.server.listen:
        if not address.startswith("unix:"):
            host, _, port = address.rpartition(":")
            host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)  # noqa: S104
            return f"http://{host}:{port}"
    raise ConfigError(f"{config.source} listens on unix sockets only: give --url (or "
                      "$RATELIMITD_URL)")
