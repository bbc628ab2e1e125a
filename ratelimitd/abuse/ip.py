"""Client addresses: canonical form, the network prefix they belong to, and the subjects
(scope, id) whose blocks apply to a request from them.

IPv4 and IPv6 are not alike: one IPv4 address is usually one host (or one NAT), while an IPv6
host routinely gets a whole /64, so counting or blocking single IPv6 addresses would let one
client walk through 2^64 of them. Hence auth failures are counted per address for IPv4 and per
`ipv6_prefix` network for IPv6.
"""

from __future__ import annotations

import ipaddress
from typing import Final

from ratelimitd.errors import RatelimitdError
from ratelimitd.policy import Subject
from ratelimitd.policy import ip_prefix as policy_ip_prefix

DEFAULT_IPV4_PREFIX: Final = 24
DEFAULT_IPV6_PREFIX: Final = 64

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class InvalidIpError(RatelimitdError, ValueError):
    """Not an IPv4 or IPv6 address (a 400 naming attributes.ip)."""


def parse_ip(text: object) -> IpAddress:
    """The address; an IPv4-mapped IPv6 address (::ffff:a.b.c.d) is the IPv4 one."""
    if not isinstance(text, str) or not text or len(text) > 64:
        raise InvalidIpError("attributes.ip: must be an IPv4 or IPv6 address")
    try:
        address = ipaddress.ip_address(text)
    except ValueError as exc:
        raise InvalidIpError("attributes.ip: must be an IPv4 or IPv6 address") from exc
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            raise InvalidIpError("attributes.ip: a zone (%...) is not part of an address")
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
    return address


def canonical_ip(text: object) -> str:
    return str(parse_ip(text))


def check_prefix_bits(ipv4_bits: int, ipv6_bits: int) -> None:
    if not 1 <= ipv4_bits <= 32:
        raise ValueError("ipv4_prefix must be from 1 to 32")
    if not 1 <= ipv6_bits <= 128:
        raise ValueError("ipv6_prefix must be from 1 to 128")


def ip_prefix(text: object, ipv4_bits: int = DEFAULT_IPV4_PREFIX,
              ipv6_bits: int = DEFAULT_IPV6_PREFIX) -> str:
    """The network of the address, as the `ip_prefix` scope's id: "203.0.113.0/24" (the
    policy's own computation, on the canonical address)."""
    return policy_ip_prefix(str(parse_ip(text)), ipv4_bits, ipv6_bits)


def auth_failure_subject(text: object, ipv6_bits: int = DEFAULT_IPV6_PREFIX) -> Subject:
    """Whose failed key lookups are counted together, and blocked past the threshold: the
    IPv4 address, or the IPv6 address' network."""
    address = parse_ip(text)
    if address.version == 4:
        return Subject("ip", str(address))
    return Subject("ip_prefix", str(ipaddress.ip_network(f"{address}/{ipv6_bits}",
                                                          strict=False)))


def ip_block_subjects(text: object, ipv4_bits: int = DEFAULT_IPV4_PREFIX,
                      ipv6_bits: int = DEFAULT_IPV6_PREFIX) -> tuple[Subject, Subject]:
    """The subjects whose blocks stop a request from this address: the address itself and its
    network (manual blocks may name either; auth-failure blocks land on one of them)."""
    address = canonical_ip(text)
    return Subject("ip", address), Subject("ip_prefix", ip_prefix(address, ipv4_bits,
                                                                  ipv6_bits))
