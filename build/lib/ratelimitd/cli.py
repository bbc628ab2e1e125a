"""Command line: `ratelimitd serve`, `ratelimitd check-config`, `ratelimitd lua --show`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import uvloop
from aiohttp import web

from ratelimitd.config import Config, load_config
from ratelimitd.errors import ConfigError, EmbeddedRedisError, ListenError
from ratelimitd.http import create_app
from ratelimitd.quota.runner import shipped_library
from ratelimitd.store.embedded import EmbeddedRedis, state_directory

log = logging.getLogger("ratelimitd")
SHUTDOWN_TIMEOUT_S: Final = 10.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ratelimitd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", default=os.environ.get("RATELIMITD_CONFIG"),
                       help="TOML file (default: $RATELIMITD_CONFIG, else built-in defaults)")
    serve.add_argument("--workers", type=int, default=1,
                       help="processes sharing the listening sockets (default 1)")
    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument("path")
    lua = commands.add_parser("lua", help="the Redis function library, as built")
    lua.add_argument("--show", action="store_true",
                     help="print it, each line with its source file and line")
    args = parser.parse_args(argv)
    if args.command == "lua":
        library = shipped_library()
        print(library.annotated() if args.show else f"{library.name}: "
              f"{len(library.source.splitlines())} lines; --show prints them", end="" if
              args.show else "\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.command == "check-config":
            config = load_config(args.path)
            print(f"{args.path}: ok ({len(config.tiers)} tiers: {', '.join(config.tiers)})")
            return 0
        if args.workers < 1:
            parser.error("--workers must be at least 1")
        return run(load_config(args.config), args.workers)
    except (ConfigError, EmbeddedRedisError, ListenError) as exc:
        print(f"ratelimitd: {exc}", file=sys.stderr)
        return 2


def run(config: Config, workers: int) -> int:
    """Starts the embedded Redis when no url is configured, then serves until SIGTERM.

    Returns the exit status: 0 after SIGTERM, else that of a worker that died."""
    embedded = None
    status = 0
    redis_url = config.redis.url
    if not redis_url:
        embedded = EmbeddedRedis(state_directory(config.redis.data_dir))
        embedded.start()
        redis_url = embedded.url
        log.info("embedded redis-server on %s", embedded.socket)
    try:
        sockets = [_unix_socket(a[5:]) for a in config.server.listen if a.startswith("unix:")]
        if workers == 1:
            _serve(config, redis_url, sockets, share_port=False)
        else:
            status = _supervise(config, redis_url, sockets, workers)
    finally:
        if embedded is not None:
            embedded.stop()
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


def _supervise(config: Config, redis_url: str, sockets: list[socket.socket], workers: int) -> int:
    """Forks the workers; SIGTERM/SIGINT are passed on, and a dead worker stops the rest.

    Returns 0 when the workers stopped on SIGTERM, else the failed worker's status (or 1), so
    that a service manager sees the failure and restarts the daemon."""
    context = multiprocessing.get_context("fork")  # workers inherit the unix sockets
    procs = [context.Process(target=_worker, args=(config, redis_url, sockets),
                             name=f"ratelimitd-worker-{i}") for i in range(workers)]
    for proc in procs:
        proc.start()

    def stop(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    failed = 0
    while any(p.is_alive() for p in procs):
        for proc in procs:
            proc.join(0.5)
            if proc.exitcode not in (None, 0, -signal.SIGTERM) and not failed:
                log.error("%s exited with %s; stopping", proc.name, proc.exitcode)
                failed = proc.exitcode if proc.exitcode and proc.exitcode > 0 else 1
                stop(signal.SIGTERM, None)
    return failed


def _worker(config: Config, redis_url: str, sockets: list[socket.socket]) -> None:
    try:
        _serve(config, redis_url, sockets, share_port=True)
    except ListenError as exc:
        print(f"ratelimitd: {exc}", file=sys.stderr)
        sys.exit(2)


def _serve(config: Config, redis_url: str, sockets: list[socket.socket], share_port: bool
           ) -> None:
    """One serving process. share_port: the workers of one daemon bind the same TCP ports
    (SO_REUSEPORT); a lone process does not, so a second daemon on its port fails loudly."""
    uvloop.run(_serve_async(config, redis_url, sockets, share_port))


async def _serve_async(config: Config, redis_url: str, sockets: list[socket.socket],
                       share_port: bool) -> None:
    runner = web.AppRunner(create_app(config, redis_url), access_log=None,
                           shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    unix = iter(sockets)
    for address in config.server.listen:
        if address.startswith("unix:"):
            site: web.BaseSite = web.SockSite(runner, next(unix))
        else:
            host, _, port = address.rpartition(":")
            site = web.TCPSite(runner, host.strip("[]"), int(port), reuse_port=share_port,
                               backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ListenError(f"cannot listen on {address}: {exc.strerror or exc}") from exc
        log.info("listening on %s (pid %d)", address, os.getpid())
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    log.info("stopping: finishing requests in flight")
    await runner.cleanup()


if __name__ == "__main__":
    sys.exit(main())
