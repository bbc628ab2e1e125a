"""The Lua scripts outside the quota function library (lua/scripts/, shipped as
`ratelimitd.lua`): the key store's, the block store's and the alert lists', each run by
redis-py as one EVALSHA.

`script_source` builds one: wire.py's declarations of the packed formats it names, then with
`clock` the shared prelude (now.lua: `now` from ARGV[1], or Redis TIME), then any shared
files, then the script. A script spells no packed format itself (tests/lua holds it to that).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from importlib import resources
from typing import Final

from ratelimitd.quota import wire

SCRIPTS_DIR: Final = "scripts"
CLOCK_PRELUDE: Final = "now"


def read_script(name: str) -> str:
    """lua/scripts/<name>.lua as shipped."""
    return (resources.files("ratelimitd.lua") / SCRIPTS_DIR / f"{name}.lua").read_text()


def script_names() -> list[str]:
    """Every shipped script file, by name (without `.lua`)."""
    folder = resources.files("ratelimitd.lua") / SCRIPTS_DIR
    return sorted(entry.name.removesuffix(".lua") for entry in folder.iterdir()
                  if entry.name.endswith(".lua"))


@functools.cache  # read once: some are registered on every call
def script_source(name: str, *, clock: bool = False, shared: Sequence[str] = (),
                  formats: Sequence[wire.Format] = ()) -> str:
    """The source of script `name`, built as the module docstring says."""
    parts = [wire.lua_formats(formats)] if formats else []
    if clock:
        parts.append(read_script(CLOCK_PRELUDE))
    parts += [read_script(file) for file in (*shared, name)]
    return "\n".join(parts)
