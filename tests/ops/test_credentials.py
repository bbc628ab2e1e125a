"""Secret references resolved from a real directory, as $CREDENTIALS_DIRECTORY points to one,
and from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from ratelimitd.config.credentials import (
    CredentialError,
    read_credential,
    read_token_lines,
    resolve_secret,
    resolve_tokens,
)

TOKEN_A = "tok-a-0123456789abcdef"
TOKEN_B = "tok-b-0123456789abcdef"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "key_pepper").write_text("  0123456789abcdef\n")
    (tmp_path / "service_tokens").write_text(f"# gateways\n{TOKEN_A}\n\n  {TOKEN_B}  \n")
    (tmp_path / "admin_tokens").write_text("# none yet\n")
    (tmp_path / "short").write_text(f"{TOKEN_A}\nshort\n")
    (tmp_path / "empty").write_text("\n")
    return {"CREDENTIALS_DIRECTORY": str(tmp_path), "OTHER": "from-the-environment"}


def test_a_secret_and_token_lines(env: dict[str, str]) -> None:
    # a single secret is the whole file but its line break; token lines are stripped
    assert read_credential("key_pepper", env) == "  0123456789abcdef"
    assert read_token_lines("service_tokens", env) == (TOKEN_A, TOKEN_B)


def test_token_lists_resolve_every_form(env: dict[str, str]) -> None:
    assert resolve_tokens(("credential:service_tokens", "env:OTHER", "literal-0123456789"),
                          env) == (TOKEN_A, TOKEN_B, "from-the-environment", "literal-0123456789")
    assert resolve_secret("credential:key_pepper", env) == "  0123456789abcdef"
    assert resolve_secret("env:OTHER", env) == "from-the-environment"


@pytest.mark.parametrize(("name", "says"), [
    ("missing", "cannot read"), ("empty", "is empty"), ("admin_tokens", "holds no token"),
    ("../etc/passwd", "letters, digits"), ("..", "letters, digits")])
def test_mistakes_are_named(env: dict[str, str], name: str, says: str) -> None:
    with pytest.raises(CredentialError, match=says):
        read_token_lines(name, env)


@pytest.mark.parametrize(("value", "says"), [
    ("file:/etc/ratelimitd/token", "'file:'"), ("vault:secret/ratelimitd", "'vault:'"),
    ("Credential:service_tokens", "'Credential:'"), ("https://example.com/x", "'https:'"),
    ("env:UNSET_FOR_SURE", "UNSET_FOR_SURE is not set"), ("", "empty"),
    ("credential:short", "token 2 of credential:short is shorter than 16 bytes"),
    ("env:OTHER_SHORT", "env:OTHER_SHORT is shorter than 16 bytes"),
    ("fifteen-bytes!!", "the token is shorter than 16 bytes")])
def test_unusable_references_are_refused(env: dict[str, str], value: str, says: str) -> None:
    with pytest.raises(CredentialError, match=says) as caught:
        resolve_tokens((value,), {**env, "OTHER_SHORT": "short"})
    assert "/etc/ratelimitd/token" not in str(caught.value)  # only the prefix is quoted


def test_outside_systemd() -> None:
    with pytest.raises(CredentialError, match="CREDENTIALS_DIRECTORY is not set"):
        resolve_tokens(("credential:service_tokens",), {})
