"""The key format and the pepper: what a scanner, a client and an operator rely on."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ratelimitd.auth.keys import (
    KEY_PATTERN,
    KeysUnavailableError,
    Pepper,
    PepperError,
    generate_api_key,
    load_pepper,
    require_pepper,
    well_formed,
)
from ratelimitd.auth.keys.format import BASE62, RANDOM_CHARS


def test_a_new_key_has_the_prefix_enough_randomness_and_a_valid_checksum() -> None:
    keys = {generate_api_key() for _ in range(200)}
    assert len(keys) == 200
    assert RANDOM_CHARS * math.log2(62) >= 160
    for key in keys:
        assert key.startswith("rlk_") and len(key) == 40
        assert well_formed(key)
        assert KEY_PATTERN.search(f"leaked: {key} in a log") is not None


def test_every_single_character_change_is_refused_by_the_checksum_or_the_shape() -> None:
    key = generate_api_key()
    for i in range(4, len(key)):
        for other in "0aZ_":
            if other == key[i]:
                continue
            changed = key[:i] + other + key[i + 1:]
            assert not well_formed(changed), changed


@pytest.mark.parametrize("bad", [
    None, 42, b"rlk_", "", "rlk_", "RLK_" + "a" * 36, "rlk_" + "a" * 35, "rlk_" + "a" * 37,
    "rlk-" + "a" * 36, "rlk_" + "a" * 35 + "!", " rlk_" + "a" * 35, "x" * 100_000,
])
def test_malformed_keys_are_not_well_formed(bad: object) -> None:
    assert not well_formed(bad)


def test_a_swapped_pair_of_characters_is_caught() -> None:
    key = generate_api_key()
    body = list(key)
    i = next(j for j in range(4, 33) if body[j] != body[j + 1])
    body[i], body[i + 1] = body[i + 1], body[i]
    assert not well_formed("".join(body))


def test_the_pepper_comes_from_the_environment_first(tmp_path: Path) -> None:
    (tmp_path / "key_pepper").write_text("f" * 40 + "\n")
    env = {"RATELIMITD_KEY_PEPPER": "e" * 40, "CREDENTIALS_DIRECTORY": str(tmp_path)}
    from_env = load_pepper(environ=env)
    from_file = load_pepper(environ={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert from_env is not None and from_file is not None
    key = generate_api_key()
    assert from_env.key_hash(key) == Pepper(b"e" * 40).key_hash(key)
    # the file's trailing newline is not part of the pepper
    assert from_file.key_hash(key) == Pepper(b"f" * 40).key_hash(key)


def test_a_configured_pepper_reference_must_resolve(tmp_path: Path) -> None:
    (tmp_path / "pepper-a").write_text("a" * 40 + "\n")
    env = {"RATELIMITD_KEY_PEPPER": "e" * 40, "CREDENTIALS_DIRECTORY": str(tmp_path)}
    configured = load_pepper("credential:pepper-a", environ=env)
    key = generate_api_key()
    assert configured is not None and configured.key_hash(key) == Pepper(b"a" * 40).key_hash(key)
    for reference, says in (("credential:missing", "cannot read"),
                            ("file:/etc/pepper", "'file:'"), ("env:UNSET_PEPPER", "not set")):
        with pytest.raises(PepperError, match=says):
            load_pepper(reference, environ=env)


def test_no_pepper_turns_key_features_off_with_a_clear_error(tmp_path: Path) -> None:
    assert load_pepper(environ={}) is None
    assert load_pepper(environ={"CREDENTIALS_DIRECTORY": str(tmp_path)}) is None
    with pytest.raises(KeysUnavailableError, match="RATELIMITD_KEY_PEPPER"):
        require_pepper(environ={})


def test_a_short_pepper_is_refused_and_a_pepper_never_shows_in_repr() -> None:
    with pytest.raises(PepperError, match="at least 32 bytes"):
        load_pepper(environ={"RATELIMITD_KEY_PEPPER": "short"})
    pepper = Pepper(b"s" * 32)
    assert "s" * 32 not in repr(pepper) and "s" * 32 not in str(pepper)


def test_ids_and_hashes_depend_on_the_pepper() -> None:
    key = generate_api_key()
    a, b = Pepper(b"a" * 32), Pepper(b"b" * 32)
    assert a.key_id(key) != b.key_id(key)
    assert a.key_hash(key) != b.key_hash(key)
    assert a.key_id(key).startswith("key_") and len(a.key_id(key)) == 21
    assert set(a.key_id(key)[4:]) <= set(BASE62)
    assert a.key_id(key) == a.key_id(key)
    assert a.signing_secret("key_x", "seed1") != a.signing_secret("key_x", "seed2")
