"""`ratelimitd keys create|rotate|revoke|show` and `ratelimitd blocks add|remove|list`.

The admin API's twins for an operator. They need only what they use: the daemons' Redis
(`--redis-url`, else [redis] url of `--config` or $RATELIMITD_CONFIG, else the embedded
server's unix socket in the state directory, which must be running) and, for `keys`, the same
pepper as the daemons ([keys] pepper, RATELIMITD_KEY_PEPPER or the credential key_pepper);
the configuration's other secrets are not read. The answer is JSON on stdout, its times ISO
8601 UTC. A revoke or rotate publishes the invalidation, so running daemons drop the key at
once. A mistake prints {"error": {"code", "message"}} and exits 1; a missing or bad setting
prints what is missing and exits 2. Creations from here are not counted against any network:
the operator is not a sign-up flow.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Final

import orjson

from ratelimitd.abuse import BlockInputError
from ratelimitd.auth import Access, open_access
from ratelimitd.auth.keys import (
    KeyInputError,
    KeyNotFoundError,
    KeyStateError,
    PepperError,
    load_pepper,
)
from ratelimitd.config import Config, load_config
from ratelimitd.errors import ApiError, ConfigError, StoreUnavailable
from ratelimitd.store.connect import connect
from ratelimitd.store.embedded import EmbeddedRedis, state_directory
from ratelimitd.store.failures import store_failures

COMMANDS: Final = ("keys", "blocks")
_URL_SCHEMES: Final = ("redis://", "rediss://", "unix://")
# an operator's command may wait on a busy Redis longer than the hot path's timeout
CLI_TIMEOUT_MS: Final = 5000


def add_commands(commands: Any) -> None:
    """Adds `keys` and `blocks` to the `ratelimitd` parser's subcommands."""
    keys = commands.add_parser("keys", help="create, rotate, revoke or show API keys")
    actions = keys.add_subparsers(dest="action", required=True)
    create = _action(actions, "create", "a new key (printed once: store it now)")
    create.add_argument("--user", required=True)
    create.add_argument("--tier", required=True)
    create.add_argument("--org")
    create.add_argument("--expires-in-days", type=int)
    create.add_argument("--require-signature", action="store_true",
                        help="the key signs its requests; prints its signing_secret too")
    rotate = _action(actions, "rotate", "a new key; the old one works --grace-s more")
    rotate.add_argument("key_id")
    rotate.add_argument("--grace-s", type=int, help="default [keys] rotation_grace_s")
    _action(actions, "revoke", "refuse the key on every daemon within 1 s").add_argument(
        "key_id")
    _action(actions, "show", "a key's metadata (never the key)").add_argument("key_id")

    blocks = commands.add_parser("blocks", help="add, remove or list blocks")
    actions = blocks.add_subparsers(dest="action", required=True)
    add = _action(actions, "add", "refuse a subject's reserves (403 blocked) for --ttl-s")
    _subject_args(add)
    add.add_argument("--ttl-s", type=int, required=True)
    add.add_argument("--reason", required=True)
    _subject_args(_action(actions, "remove", "lift a subject's block"))
    _action(actions, "list", "the blocks in force").add_argument("--limit", type=int,
                                                                  default=1000)


def _action(actions: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = actions.add_parser(name, help=help_text)
    parser.add_argument("--config", default=os.environ.get("RATELIMITD_CONFIG"),
                        help="TOML file (default: $RATELIMITD_CONFIG, else built-in defaults)")
    parser.add_argument("--redis-url", metavar="URL",
                        help="the daemons' Redis: redis://host:port, rediss://… or "
                             "unix:///path (default: [redis] url, else the embedded Redis)")
    return parser


def _subject_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scope", required=True,
                        help="key, user, org, ip, ip_prefix or an attribute name")
    parser.add_argument("--id", required=True, dest="subject_id")


def run(args: argparse.Namespace) -> int:
    """Runs a `keys` or `blocks` command; a setting that is missing or wrong is a
    ConfigError (the caller prints it and exits 2)."""
    config = _settings(args)
    try:
        answer = asyncio.run(_run(config, args))
    except ApiError as exc:
        _print({"error": {"code": exc.code, "message": exc.message}}, sys.stderr)
        return 1
    _print(readable_times(answer), sys.stdout)
    return 0


def _settings(args: argparse.Namespace) -> Config:
    """The configuration with --redis-url applied, once it holds what the command needs."""
    config = load_config(args.config, secrets=False)
    where = (f"--config {args.config}" if args.config
             else "--config FILE (or $RATELIMITD_CONFIG)")
    if args.redis_url:
        if not args.redis_url.startswith(_URL_SCHEMES):
            raise ConfigError(f"--redis-url {args.redis_url[:60]!r}: use redis://host:port, "
                              "rediss://host:port (TLS) or unix:///path/to/redis.sock")
        config = dataclasses.replace(config, redis=dataclasses.replace(config.redis,
                                                                       url=args.redis_url))
    elif not config.redis.url:
        embedded = EmbeddedRedis(state_directory(config.redis.data_dir))
        if not embedded.socket.exists():
            raise ConfigError(
                f"`{args.command} {args.action}` needs the daemons' Redis: give --redis-url, "
                f"or [redis] url in {where}; with no url it uses the embedded Redis of a "
                f"daemon on this host, whose socket {embedded.socket} does not exist "
                "(set [redis] data_dir or $STATE_DIRECTORY to the daemon's state directory)")
    if args.command == "keys":
        try:
            pepper = load_pepper(config.keys.pepper)
        except PepperError as exc:
            raise ConfigError(f"[keys] pepper: {exc}") from None
        if pepper is None:
            raise ConfigError(
                f"`keys {args.action}` needs the daemons' key pepper: set "
                f"RATELIMITD_KEY_PEPPER, or [keys] pepper in {where}, or "
                "CREDENTIALS_DIRECTORY to a directory holding key_pepper")
    return config


def readable_times(data: Any) -> Any:
    """Epoch-ms times ("expires_at_ms") as ISO 8601 UTC ("expires_at"), at any depth."""
    if isinstance(data, list):
        return [readable_times(item) for item in data]
    if not isinstance(data, dict):
        return data
    return {(key.removesuffix("_ms") if key.endswith("_at_ms") else key):
            (iso_utc(value) if key.endswith("_at_ms") and isinstance(value, int)
             else readable_times(value))
            for key, value in data.items()}


def iso_utc(ms: int) -> str:
    """2027-03-05T12:36:40Z: whole seconds, UTC."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


def _print(data: Any, stream: Any) -> None:
    stream.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


def redis_url(config: Config) -> str:
    """The daemon's Redis: the configured url, else the embedded server's socket."""
    return config.redis.url or EmbeddedRedis(state_directory(config.redis.data_dir)).url


async def _run(config: Config, args: argparse.Namespace) -> Any:
    settings = dataclasses.replace(config.redis,
                                   timeout_ms=max(config.redis.timeout_ms, CLI_TIMEOUT_MS))
    client = connect(settings, redis_url(config))
    if args.command == "blocks":  # blocks need no pepper: none is read
        config = dataclasses.replace(config, keys=dataclasses.replace(config.keys, pepper=""))
    environ = os.environ if args.command == "keys" else {}
    try:
        access = await open_access(config, client, listen=False, environ=environ)
        try:
            return await _dispatch(access, args)
        finally:
            await access.aclose()
    except StoreUnavailable as exc:
        raise ApiError(503, "backend_unavailable",
                       f"Redis at {redis_url(config)} did not answer ({exc}); is the daemon "
                       "(or its Redis) running?") from exc
    except (KeyInputError, BlockInputError) as exc:
        raise ApiError(400, "invalid_request", str(exc)) from exc
    except KeyNotFoundError as exc:
        raise ApiError(404, "key_not_found", str(exc)) from exc
    except KeyStateError as exc:
        raise ApiError(409, exc.code, exc.message) from exc
    finally:
        await client.aclose()


async def _dispatch(access: Access, args: argparse.Namespace) -> Any:
    handlers: dict[tuple[str, str], Callable[[Access, argparse.Namespace], Awaitable[Any]]] = {
        ("keys", "create"): _create, ("keys", "rotate"): _rotate, ("keys", "revoke"): _revoke,
        ("keys", "show"): _show, ("blocks", "add"): _block, ("blocks", "remove"): _unblock,
        ("blocks", "list"): _list,
    }
    async with store_failures():
        return await handlers[(args.command, args.action)](access, args)


async def _create(access: Access, args: argparse.Namespace) -> Any:
    created = await access.require_keys().create(args.user, args.tier, args.org,
                                                 args.expires_in_days, args.require_signature)
    return created.to_json()


async def _rotate(access: Access, args: argparse.Namespace) -> Any:
    return (await access.require_keys().rotate(args.key_id, args.grace_s)).to_json()


async def _revoke(access: Access, args: argparse.Namespace) -> Any:
    await access.require_keys().revoke(args.key_id)
    return {"revoked": True}


async def _show(access: Access, args: argparse.Namespace) -> Any:
    return (await access.require_keys().show(args.key_id)).to_json()


async def _block(access: Access, args: argparse.Namespace) -> Any:
    if args.scope == "global":
        raise ApiError(400, "invalid_request", "scope: a global block is not offered (it "
                                               "would refuse every call)")
    subject = access.blocks.subject(args.scope, args.subject_id)
    return (await access.blocks.add(subject, args.ttl_s, args.reason)).to_json()


async def _unblock(access: Access, args: argparse.Namespace) -> Any:
    subject = access.blocks.subject(args.scope, args.subject_id)
    return {"removed": await access.blocks.remove(subject)}


async def _list(access: Access, args: argparse.Namespace) -> Any:
    return {"blocks": [b.to_json() for b in await access.blocks.list(args.limit)]}
