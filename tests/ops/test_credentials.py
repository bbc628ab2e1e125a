"""systemd credentials read from a real directory, as $CREDENTIALS_DIRECTORY points to one."""

from __future__ import annotations

from pathlib import Path

import pytest

from ratelimitd.ops.credentials import (
    CredentialError,
    expand_secrets,
    read_credential,
    read_token_lines,
)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "key_pepper").write_text("  0123456789abcdef\n")
    (tmp_path / "service_tokens").write_text("# gateways\ntok-a\n\n  tok-b  \n")
    (tmp_path / "admin_tokens").write_text("# none yet\n")
    (tmp_path / "empty").write_text("\n")
    return {"CREDENTIALS_DIRECTORY": str(tmp_path)}


def test_a_secret_and_token_lines(env: dict[str, str]) -> None:
    assert read_credential("key_pepper", env) == "0123456789abcdef"
    assert read_token_lines("service_tokens", env) == ("tok-a", "tok-b")


def test_config_lists_expand(env: dict[str, str]) -> None:
    assert expand_secrets(("credential:service_tokens", "env:OTHER", "literal"), env) == (
        "tok-a", "tok-b", "env:OTHER", "literal")


@pytest.mark.parametrize(("name", "says"), [
    ("missing", "cannot read"), ("empty", "is empty"), ("admin_tokens", "holds no token"),
    ("../etc/passwd", "letters, digits"), ("..", "letters, digits")])
def test_mistakes_are_named(env: dict[str, str], name: str, says: str) -> None:
    with pytest.raises(CredentialError, match=says):
        read_token_lines(name, env)


def test_outside_systemd() -> None:
    with pytest.raises(CredentialError, match="CREDENTIALS_DIRECTORY is not set"):
        read_credential("key_pepper", {})
