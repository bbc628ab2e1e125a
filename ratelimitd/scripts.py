"""The Lua scripts of lua/, loaded once and run by SHA (EVALSHA, reloaded on NOSCRIPT)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

LUA_DIR: Final = Path(__file__).resolve().parent.parent / "lua"
ENTRY_SCRIPTS: Final = ("reserve", "settle")

RedisClient = Redis | RedisCluster


def script_source(name: str) -> str:
    """An entry script with the shared helpers of common.lua in front of it."""
    folder = LUA_DIR
    return (folder / "common.lua").read_text() + "\n" + (folder / f"{name}.lua").read_text()


@dataclass(frozen=True, slots=True)
class Scripts:
    reserve: AsyncScript
    settle: AsyncScript

    @classmethod
    def register(cls, client: RedisClient) -> Scripts:
        return cls(*(client.register_script(script_source(n)) for n in ENTRY_SCRIPTS))

    async def load(self, client: RedisClient) -> None:
        """Loads every script now, so the first decisions do not pay for it."""
        for script in (self.reserve, self.settle):
            await client.script_load(script.script)


async def run(script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
    """EVALSHA; redis-py loads the script and retries when Redis answers NOSCRIPT."""
    return await script(keys=keys, args=args)
