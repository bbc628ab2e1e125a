"""Subjects: who a limit counts against, and the plan of a reserve (which subjects, in which
order, with which limits)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ratelimitd.policy.limits import Limit, Tier


@dataclass(frozen=True, slots=True)
class Subject:
    """Who a limit counts against, e.g. Subject("user", "u1"). Its tag is its hash slot."""

    scope: str
    id: str
    # made once: a reserve names its subjects' tags several times
    tag: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        # '{' and '}' would end the Redis Cluster hash tag early; '%' escapes them.
        safe = self.id.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
        object.__setattr__(self, "tag", f"{self.scope}:{safe}")


@dataclass(frozen=True, slots=True)
class Identity:
    """What a reserve knows about its caller."""

    user: str
    tier: str
    org: str | None = None
    key_id: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PrefixLengths:
    """How long the `ip_prefix` scope's networks are ([abuse] ipv4_prefix / ipv6_prefix)."""

    ipv4: int = 24
    ipv6: int = 64


DEFAULT_PREFIXES = PrefixLengths()


def subject_id(scope: str, who: Identity,
               prefixes: PrefixLengths = DEFAULT_PREFIXES) -> str | None:
    """The id a limit of this scope counts against, or None when the request does not say."""
    if scope == "user":
        return who.user
    if scope == "org":
        return who.org
    if scope == "key":
        return who.key_id
    if scope == "global":
        return "*"
    if scope == "ip_prefix":
        ip = who.attributes.get("ip")
        return ip_prefix(ip, prefixes.ipv4, prefixes.ipv6) if ip else None
    return who.attributes.get(scope)


def ip_prefix(ip: str, ipv4_bits: int = 24, ipv6_bits: int = 64) -> str:
    """The network an address belongs to for per-network limits: by default /24 for IPv4,
    /64 for IPv6. `ip` is canonical already (guard.canonical_ip maps ::ffff:a.b.c.d to IPv4)."""
    address = ipaddress.ip_address(ip)
    bits = ipv4_bits if address.version == 4 else ipv6_bits
    return str(ipaddress.ip_network(f"{address}/{bits}", strict=False))


def plan(tier: Tier, who: Identity,
         prefixes: PrefixLengths = DEFAULT_PREFIXES) -> list[tuple[Subject, Sequence[Limit]]]:
    """Groups the tier's limits by the subject they count against, in visiting order.

    The caller's user always comes first, even without limits of its own: its slot holds the
    reservation record that commit and release find. A limit whose scope the request does not
    name (no org, no ip attribute…) does not apply.
    """
    subjects: list[tuple[Subject, Sequence[Limit]]] = [(Subject("user", who.user), ())]
    for scope, limits in tier.scope_groups:
        sid = subject_id(scope, who, prefixes)
        if sid is None:
            continue
        if scope == "user":
            subjects[0] = (subjects[0][0], limits)
        else:
            subjects.append((Subject(scope, sid), limits))
    return subjects


