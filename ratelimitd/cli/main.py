"""Command line: `ratelimitd serve`, `ratelimitd check-config`, `ratelimitd lua --show`,
`ratelimitd usage SCOPE ID`, and the admin commands `ratelimitd keys ...` /
`ratelimitd blocks ...` (admin.py)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

import uvloop
from aiohttp import web

from ratelimitd import __version__
from ratelimitd.cli import admin, usage_report
from ratelimitd.cli.prefork import prepare_fork
from ratelimitd.config import Config, load_config
from ratelimitd.envoy.service import grpc_ctx
from ratelimitd.errors import ConfigError, EmbeddedRedisError, ListenError
from ratelimitd.http import create_app
from ratelimitd.http.lifecycle import BEAT_INTERVAL_S, Liveness, liveness_ctx
from ratelimitd.http.reload import reload_config
from ratelimitd.http.server import (
    SHUTDOWN_TIMEOUT_S,
    GuardedSite,
    connection_guard,
    runner_options,
)
from ratelimitd.ops.logs import flush_log, setup_logging
from ratelimitd.ops.metric_sharing import MetricsDirectory
from ratelimitd.ops.sdnotify import SystemdNotifier, WorkerHeartbeats
from ratelimitd.quota.runner import shipped_library
from ratelimitd.store.embedded import EmbeddedRedis, die_with_parent, state_directory
from ratelimitd.store.supervisor import StoreHealth, Supervisor
from ratelimitd.units import nano_to_usd

log = logging.getLogger("ratelimitd")
# allocations of containers between two collections of the youngest generation (default 700)
GC_GEN0_THRESHOLD: Final = 20_000

SERVE_EPILOG: Final = """environment:
  RATELIMITD_CONFIG    configuration file when --config is not given
  STATE_DIRECTORY      the embedded Redis's directory when [redis] data_dir is "" (systemd
                       sets it from StateDirectory=); else ~/.local/state/ratelimitd
  TIKTOKEN_CACHE_DIR   where tiktoken's rank files are kept (default: the system temp dir)
  CREDENTIALS_DIRECTORY  where a secret configured as "credential:NAME" is read (systemd's
                       LoadCredential= sets it)
  RATELIMITD_KEY_PEPPER  the key pepper when [keys] pepper is ""
  any NAME             a secret configured as "env:NAME" (tokens, webhook secret, pepper)

signals:
  SIGTERM, SIGINT      finish the requests in flight, stop the embedded Redis, exit 0
  SIGHUP               reload the configuration file: tiers, prices, tokens (an invalid file
                       is logged and the one in use kept); listen, redis, reservations,
                       alerts, anomaly and calendar changes need a restart

exit status: 0 after SIGTERM; 1 when a worker or the embedded Redis failed for good;
2 for a bad configuration, state directory or listen address."""


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(prog="ratelimitd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"ratelimitd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="run the daemon", description="Serve the HTTP API (see docs/http-api.md).",
        epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--config", default=os.environ.get("RATELIMITD_CONFIG"), metavar="PATH",
                       help="TOML file (default: $RATELIMITD_CONFIG, else built-in defaults)")
    serve.add_argument("--workers", type=int, default=1, metavar="N",
                       help="processes sharing the listening sockets (default 1)")
    check = commands.add_parser(
        "check-config", help="validate a configuration file",
        description="Check a configuration: every mistake with its key (and line), or the "
                    "parsed tiers and their limits.")
    check.add_argument("path", nargs="?", default=os.environ.get("RATELIMITD_CONFIG"),
                       help="TOML file (default: $RATELIMITD_CONFIG)")
    lua = commands.add_parser("lua", help="the Redis function library, as built")
    lua.add_argument("--show", action="store_true",
                     help="print it, each line with its source file and line")
    admin.add_commands(commands)
    usage_report.add_parser(commands)
    return parser, serve


def main(argv: Sequence[str] | None = None) -> int:
    parser, serve = _parser()
    args = parser.parse_args(argv)
    if args.command == "usage":
        return usage_report.main(args)
    if args.command == "lua":
        library = shipped_library()
        print(library.annotated() if args.show else f"{library.name}: "
              f"{len(library.source.splitlines())} lines; --show prints them", end="" if
              args.show else "\n")
        return 0
    if args.command == "serve" and args.workers < 1:
        serve.error("--workers must be at least 1")
    if args.command == "check-config" and args.path is None:
        parser.error("check-config needs a file: give its path or set RATELIMITD_CONFIG")
    setup_logging()  # JSON lines on stderr (journald keeps them as they are)
    try:
        if args.command in admin.COMMANDS:
            return admin.run(args)
        if args.command == "check-config":
            config = load_config(args.path)
            print(f"{args.path}: ok ({len(config.tiers)} tiers: {', '.join(config.tiers)})")
            print(describe_tiers(config), end="")
            rules = config.envoy_rules
            if rules.files:
                print(f"envoy rules: {len(rules.rule_names())} in domains "
                      f"{', '.join(sorted(rules.domains))} ({', '.join(rules.files)})")
            return 0
        return run(load_config(args.config), args.workers)
    except (ConfigError, EmbeddedRedisError, ListenError) as exc:
        for line in str(exc).splitlines():  # a configuration's mistakes: one a line
            print(f"ratelimitd: {line}", file=sys.stderr)
        return 2


def describe_tiers(config: Config) -> str:
    """The parsed tiers, one line per limit and cap, as check-config prints them."""
    lines = []
    for tier in config.tiers.values():
        caps = [f"{name} {value}" for name, value in (
            ("max_output_tokens", tier.max_output_tokens),
            ("max_prompt_chars", tier.max_prompt_chars),
            ("max_input_tokens", tier.max_input_tokens)) if value is not None]
        lines.append(f"tier {tier.name}" + (f" ({', '.join(caps)})" if caps else "") + ":")
        for lim in tier.limits:
            amount = (f"{nano_to_usd(lim.limit)} USD" if lim.metric == "cost_usd"
                      else f"{lim.limit} {lim.metric}")
            if lim.metric == "concurrent":
                span = "in flight"
            elif lim.algorithm == "token_bucket":
                span = f"per {lim.window_text}, token bucket burst {lim.burst}"
            elif lim.algorithm == "calendar":
                span = f"per calendar {lim.period} ({config.calendar.timezone})"
            else:
                span = f"per sliding {lim.window_text}"
            lines.append(f"  {lim.name}: {amount} {span}, per {lim.scope}")
        if not tier.limits:
            lines.append("  (no limits)")
    return "".join(f"{line}\n" for line in lines)


def run(config: Config, workers: int) -> int:
    """Starts the embedded Redis (supervised) when no url is configured, then serves until
    SIGTERM. Returns the exit status: 0 after SIGTERM, else 1 when a worker died or the
    embedded Redis could not be kept running."""
    log.info("ratelimitd %s starting (%d worker%s, config %s)", __version__, workers,
             "s" if workers > 1 else "", config.source)
    # until a process has its reload handler, a SIGHUP must not kill it (the default action);
    # forked workers inherit this
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    supervisor = None
    health = None
    status = 0
    redis_url = config.redis.url
    if not redis_url:
        embedded = EmbeddedRedis(state_directory(config.redis.data_dir))
        embedded.start()
        redis_url = embedded.url
        health = StoreHealth()
        supervisor = Supervisor(embedded, health,
                                on_give_up=lambda: os.kill(os.getpid(), signal.SIGTERM))
        log.info("embedded redis-server on %s", embedded.socket)
    try:
        sockets = [_unix_socket(a[5:]) for a in config.server.listen if a.startswith("unix:")]
        if workers == 1:
            if supervisor is not None:
                supervisor.watch()
            _serve(config, redis_url, sockets, share_port=False, health=health,
                   liveness=Liveness(notifier=SystemdNotifier()))
        else:
            prepare_fork(config)  # shared pages: docs/performance.md, "Memory per worker"
            metrics_dir = MetricsDirectory.create()  # the workers' samples, summed on /metrics
            try:
                status = _supervise(config, redis_url, sockets, workers, health,
                                    supervisor.watch if supervisor is not None else None,
                                    metrics_dir)
            finally:
                metrics_dir.remove()
    finally:
        if supervisor is not None:
            supervisor.stop()
    if supervisor is not None and supervisor.failed:
        status = 1
    log.info("ratelimitd stopped", extra={"exit_status": status})
    return status


def _unix_socket(path: str) -> socket.socket:
    """Bound once here and shared by every worker (SO_REUSEPORT is for TCP only)."""
    target = Path(path)
    target.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on unix:{path}: {exc.strerror or exc}") from exc
    os.chmod(path, 0o660)
    sock.listen(1024)
    return sock


def _supervise(config: Config, redis_url: str, sockets: list[socket.socket], workers: int,
               health: StoreHealth | None, after_fork: Callable[[], None] | None,
               metrics_dir: MetricsDirectory) -> int:
    """Forks the workers; SIGTERM/SIGINT are passed on, and a dead worker stops the rest.

    Returns 0 when the workers stopped on SIGTERM, else the failed worker's status (or 1), so
    that a service manager sees the failure and restarts the daemon."""
    context = multiprocessing.get_context("fork")  # workers inherit the unix sockets
    # the supervisor speaks to systemd for every worker: READY=1 once each has beaten,
    # WATCHDOG=1 only while each beats (docs/operations.md)
    notifier, beats = SystemdNotifier(), WorkerHeartbeats(workers, context)
    procs = [context.Process(target=_worker,
                             args=(config, redis_url, sockets, health, metrics_dir.path,
                                   Liveness(beats=beats, worker=i)),
                             name=f"ratelimitd-worker-{i}") for i in range(workers)]
    for proc in procs:
        proc.start()
    if after_fork is not None:  # threads start after the forks, never copied into a worker
        after_fork()

    def stop(signum: int, _frame: object) -> None:
        notifier.stopping()
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP,
                  lambda _signum, _frame: _forward_reload(config.source, procs, notifier, beats))
    failed = 0
    gone: set[int] = set()
    pinger = _Pinger(notifier, beats)
    while any(p.is_alive() for p in procs):
        for proc in procs:
            proc.join(0.25)
            pinger.tick()
            if proc.exitcode is not None and proc.pid is not None and proc.pid not in gone:
                gone.add(proc.pid)
                metrics_dir.mark_dead(proc.pid)  # its totals stay in /metrics
            if proc.exitcode not in (None, 0, -signal.SIGTERM) and not failed:
                log.error("%s exited with %s; stopping", proc.name, proc.exitcode)
                failed = proc.exitcode if proc.exitcode and proc.exitcode > 0 else 1
                stop(signal.SIGTERM, None)
    notifier.close()
    return failed


class _Pinger:
    """The supervisor's READY=1 (once every worker has beaten) and WATCHDOG=1 (every half
    WatchdogSec, only while every worker's beat is fresh: a stuck worker gets no ping)."""

    def __init__(self, notifier: SystemdNotifier, beats: WorkerHeartbeats) -> None:
        self.notifier = notifier
        self.beats = beats
        self.ready = False
        self.next_ping = 0.0

    def tick(self) -> None:
        if not self.notifier.enabled:
            return
        if not self.ready:
            if self.beats.all_started():
                self.ready = True
                self.notifier.ready(f"serving ({self.beats.workers} workers)")
            return
        interval = self.notifier.watchdog_interval_s
        now = time.monotonic()
        if interval is not None and now >= self.next_ping:
            max_age = max(2 * interval, 2 * BEAT_INTERVAL_S + 0.5)
            if self.beats.all_fresh(max_age):
                self.notifier.watchdog()
                self.next_ping = now + interval
            else:
                log.warning("no ping to systemd: workers %s have not beaten for %.1f s",
                            self.beats.stale(max_age), max_age)
                self.next_ping = now + interval


def _forward_reload(path: str, procs: Sequence[multiprocessing.process.BaseProcess],
                    notifier: SystemdNotifier, beats: WorkerHeartbeats) -> None:
    """SIGHUP in the supervisor: an invalid file is one error line and nothing changes; a
    valid one is reloaded by every worker (each re-reads it: http/reload.py)."""
    try:
        load_config(None if path.startswith("<") else path)
    except ConfigError as exc:
        log.error("reload refused, keeping the configuration in use: %s", exc,
                  extra={"event": "reload", "ok": False})
        return
    notifier.reloading()
    beats.reload_sent()
    for proc in procs:
        if proc.is_alive() and proc.pid is not None:
            os.kill(proc.pid, signal.SIGHUP)
    notifier.ready()  # the workers swap in place and never stop serving


def _worker(config: Config, redis_url: str, sockets: list[socket.socket],
            health: StoreHealth | None, metrics_dir: Path, liveness: Liveness) -> None:
    die_with_parent(signal.SIGTERM)  # a worker never outlives its daemon (kill -9 of it)
    try:
        _serve(config, redis_url, sockets, share_port=True, health=health,
               metrics_dir=metrics_dir, liveness=liveness)
    except ListenError as exc:
        print(f"ratelimitd: {exc}", file=sys.stderr)
        sys.exit(2)


def _serve(config: Config, redis_url: str, sockets: list[socket.socket], share_port: bool,
           health: StoreHealth | None, metrics_dir: Path | None = None,
           liveness: Liveness | None = None) -> None:
    """One serving process. share_port: the workers of one daemon bind the same TCP ports
    (SO_REUSEPORT); a lone process does not, so a second daemon on its port fails loudly."""
    try:
        uvloop.run(_serve_async(config, redis_url, sockets, share_port, health, metrics_dir,
                                liveness or Liveness()))
    finally:
        flush_log()  # access lines still kept: a forked worker skips logging's own at exit


async def _serve_async(config: Config, redis_url: str, sockets: list[socket.socket],
                       share_port: bool, health: StoreHealth | None,
                       metrics_dir: Path | None, liveness: Liveness) -> None:
    server = config.server
    app = create_app(config, redis_url, health, metrics_dir)
    app.cleanup_ctx.append(grpc_ctx)  # [grpc] listen: Envoy's rate limit service
    app.cleanup_ctx.append(liveness_ctx(liveness))  # last: READY=1 needs Redis and gRPC
    options = runner_options(server)
    runner = web.AppRunner(app, **options)
    await runner.setup()
    guard = connection_guard(server, app, options)
    lane = guard.lane
    assert lane is not None
    guard.start()
    # before listening: from its first answer on, SIGTERM stops this process gently (not the
    # default action) and SIGHUP reloads it (ignored until now)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    reloads: set[asyncio.Task[None]] = set()

    def on_sighup() -> None:
        task = loop.create_task(_reload(app, liveness))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    if liveness.beats is not None and liveness.beats.reloads_sent:
        on_sighup()  # passed on while this worker still ignored SIGHUP
    unix = iter(sockets)
    for address in config.server.listen:
        if address.startswith("unix:"):
            site = GuardedSite(runner, guard, sock=next(unix))
        else:
            host, _, port = address.rpartition(":")
            site = GuardedSite(runner, guard, address=(host.strip("[]"), int(port)),
                               reuse_port=share_port)
        try:
            await site.start()
        except OSError as exc:
            await guard.stop()
            await runner.cleanup()
            raise ListenError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
        log.info("listening on %s (pid %d)", address, os.getpid())
    _settle_collector()
    await stopping.wait()
    if liveness.notifier is not None:
        liveness.notifier.stopping()
    log.info("stopping: finishing requests in flight")
    await lane.drain(SHUTDOWN_TIMEOUT_S)
    await guard.stop()
    await runner.cleanup()


def _settle_collector() -> None:
    """Once serving: what lives now (configuration, tokenizer tables, the app) lives as long
    as the process, so it is frozen out of every later collection; and the youngest generation
    is collected less often, as a request leaves a few hundred short-lived containers behind."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


async def _reload(app: web.Application, liveness: Liveness) -> None:
    if liveness.notifier is not None:
        liveness.notifier.reloading()
    await reload_config(app)
    if liveness.notifier is not None:
        liveness.notifier.ready()


if __name__ == "__main__":
    sys.exit(main())
