"""systemd credentials: secrets the service manager hands over as files, not in the config.

The unit loads them with `LoadCredential=NAME:/etc/ratelimitd/credentials/NAME`; systemd copies
each into a private directory ($CREDENTIALS_DIRECTORY, readable by the service only, never in
the environment or in `systemctl show`). A configuration then names a secret as
`"credential:NAME"` where it would put the secret itself (this module reads it; wiring that
form into config.resolve_secret is the lead's step, see docs/operations.md).

Token files hold one token per line; blank lines and lines starting with '#' are skipped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final

PREFIX: Final = "credential:"
_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class CredentialError(ValueError):
    """A credential is missing, misnamed or empty; the message says which and why."""


def credential_path(name: str, environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise CredentialError(f"credential name {name!r}: letters, digits, '_', '.', '-' only")
    directory = env.get("CREDENTIALS_DIRECTORY", "")
    if not directory:
        raise CredentialError(
            f"credential {name!r}: $CREDENTIALS_DIRECTORY is not set (the daemon was not "
            f"started by systemd with LoadCredential={name}:…)")
    return Path(directory) / name


def read_credential(name: str, environ: Mapping[str, str] | None = None) -> str:
    """The whole credential, surrounding whitespace removed (a key pepper, a webhook secret)."""
    path = credential_path(name, environ)
    try:
        secret = path.read_text().strip()
    except OSError as exc:
        raise CredentialError(f"credential {name!r}: cannot read {path}: "
                              f"{exc.strerror or exc}") from exc
    if not secret:
        raise CredentialError(f"credential {name!r} is empty")
    return secret


def read_token_lines(name: str, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """One token per line (service or admin tokens); at least one."""
    lines = read_credential(name, environ).splitlines()
    tokens = tuple(t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#"))
    if not tokens:
        raise CredentialError(f"credential {name!r} holds no token (only comments)")
    return tokens


def expand_secrets(values: tuple[str, ...], environ: Mapping[str, str] | None = None
                   ) -> tuple[str, ...]:
    """A configured token list with each "credential:NAME" replaced by the tokens it holds;
    other entries are left as they are (for the caller's own "env:" handling)."""
    out: list[str] = []
    for value in values:
        if value.startswith(PREFIX):
            out.extend(read_token_lines(value[len(PREFIX):], environ))
        else:
            out.append(value)
    return tuple(out)
