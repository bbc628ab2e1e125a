"""Secret references: the one place where a configured secret becomes the secret itself.

A secret in the configuration (a service or admin token, the webhook secret, the key pepper)
is written as one of:

- `"env:NAME"`: the environment variable NAME;
- `"credential:NAME"`: the systemd credential NAME, the file `$CREDENTIALS_DIRECTORY/NAME`
  (the unit loads it with `LoadCredential=NAME:/etc/ratelimitd/credentials/NAME`; systemd
  copies it into a directory readable by the service only, never in the environment or in
  `systemctl show`). In a token list it stands for every token of the file, one per line;
  blank lines and lines starting with '#' are skipped. A single secret (webhook secret,
  pepper) is the whole file without its trailing line break;
- anything else that starts like a reference, a letter then letters, digits, '+', '-' or '.'
  up to a ':' (`file:x`, `vault:x`, `https://…`), is refused: it is a typo or a form this
  daemon does not read, and taking it as the token itself would serve a guessable token;
- the rest is the secret itself (a literal).

Every failure is a CredentialError whose message names the reference, never a secret.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

from ratelimitd.errors import RatelimitdError

ENV_PREFIX: Final = "env:"
CREDENTIAL_PREFIX: Final = "credential:"
MIN_TOKEN_BYTES: Final = 16
# The start of a reference, as a URI scheme is spelled (RFC 3986 3.1)
_REFERENCE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_GENERATE: Final = "generate one with: openssl rand -hex 32"


class CredentialError(RatelimitdError, ValueError):
    """A secret reference that cannot be resolved; the message says which and why."""


def resolve_secret(value: str, environ: Mapping[str, str] | None = None) -> str:
    """One secret (webhook secret, pepper): a literal, env:NAME, or the whole credential."""
    env = os.environ if environ is None else environ
    if value.startswith(CREDENTIAL_PREFIX):
        return read_credential(value[len(CREDENTIAL_PREFIX):], env)
    return _literal_or_env(value, env)


def resolve_tokens(values: Iterable[str], environ: Mapping[str, str] | None = None
                   ) -> tuple[str, ...]:
    """A token list (service or admin tokens) with every reference resolved: env:NAME is one
    token, credential:NAME every token of its file; each at least MIN_TOKEN_BYTES long."""
    env = os.environ if environ is None else environ
    tokens: list[str] = []
    for value in values:
        if value.startswith(CREDENTIAL_PREFIX):
            found = read_token_lines(value[len(CREDENTIAL_PREFIX):], env)
        else:
            found = (_literal_or_env(value, env),)
        for number, token in enumerate(found, 1):
            if len(token.encode("utf-8", "surrogateescape")) < MIN_TOKEN_BYTES:
                where = f"token {number} of {value}" if len(found) > 1 else (
                    value if value.startswith((ENV_PREFIX, CREDENTIAL_PREFIX)) else "the token")
                raise CredentialError(f"{where} is shorter than {MIN_TOKEN_BYTES} bytes, "
                                      f"too easy to guess; {_GENERATE}")
        tokens.extend(found)
    return tuple(tokens)


def _literal_or_env(value: str, env: Mapping[str, str]) -> str:
    if not value:
        raise CredentialError("an empty token would let anyone in")
    if value.startswith(ENV_PREFIX):
        name = value[len(ENV_PREFIX):]
        secret = env.get(name, "")
        if not secret:
            raise CredentialError(f"environment variable {name} is not set")
        return secret
    reference = _REFERENCE.match(value)
    if reference is not None:
        # only the prefix is quoted: the value may be a mistyped literal secret
        raise CredentialError(
            f"starts with {reference.group()!r}, which is not a reference this daemon reads "
            f"(\"env:NAME\" or \"credential:NAME\"); a literal secret must not start with a "
            f"word and ':'")
    return value


def credential_path(name: str, environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise CredentialError(f"credential name {name!r}: letters, digits, '_', '.', '-' only")
    directory = env.get("CREDENTIALS_DIRECTORY", "")
    if not directory:
        raise CredentialError(
            f"credential {name!r}: $CREDENTIALS_DIRECTORY is not set (the daemon was not "
            f"started by systemd with LoadCredential={name}:…; to check a configuration by "
            f"hand, set it to the directory that holds the credential files)")
    return Path(directory) / name


def read_credential(name: str, environ: Mapping[str, str] | None = None) -> str:
    """The whole credential without its trailing line break (a pepper, a webhook secret).
    Bytes that are not UTF-8 are kept as they are (surrogateescape)."""
    path = credential_path(name, environ)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CredentialError(f"credential {name!r}: cannot read {path}: "
                              f"{exc.strerror or exc}") from exc
    # the file as written by `echo` or `openssl rand -hex`: the newline is not part of it
    secret = data.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
    if not secret.strip():
        raise CredentialError(f"credential {name!r} ({path}) is empty")
    return secret


def read_token_lines(name: str, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """One token per line (service or admin tokens); at least one."""
    lines = read_credential(name, environ).splitlines()
    tokens = tuple(t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#"))
    if not tokens:
        raise CredentialError(f"credential {name!r} holds no token (only comments)")
    return tokens
