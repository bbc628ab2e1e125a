"""The [abuse] keys this package adds: ipv4_prefix and ipv6_prefix."""

from __future__ import annotations

import pytest

from ratelimitd.config import ConfigError, parse_config


def test_prefix_lengths_default_to_24_and_64_and_can_be_set() -> None:
    assert (parse_config({}).abuse.ipv4_prefix, parse_config({}).abuse.ipv6_prefix) == (24, 64)
    abuse = parse_config({"abuse": {"ipv4_prefix": 16, "ipv6_prefix": 48}}).abuse
    assert (abuse.ipv4_prefix, abuse.ipv6_prefix) == (16, 48)


@pytest.mark.parametrize(("key", "value"), [("ipv4_prefix", 0), ("ipv4_prefix", 33),
                                            ("ipv6_prefix", 129), ("block_s", 0)])
def test_bad_prefix_lengths_name_the_key(key: str, value: int) -> None:
    with pytest.raises(ConfigError, match=f"abuse.{key}"):
        parse_config({"abuse": {key: value}}, "test.toml")
