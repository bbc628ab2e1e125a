"""Whose blocks a reserve respects, and the 403 a block answers.

A block (blocks.py) lives on a subject's quota hash and is read by the reserve's own
Lua: subjects of the plan are checked as they are reserved, and the others a request names
are sent to the engine as `guards` (check-only calls in the same tick as the first subject,
so they add no round trip). Those are the API key, the org, the client address and its
network, and every attribute the gateway sent (device, payment fingerprint...), each unless
the plan visits it already. A global block would refuse every call, so it is not offered
(admin.py refuses it): a global limit, or stopping the gateway, does that job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ratelimitd.abuse.ip import ip_block_subjects
from ratelimitd.errors import ApiError
from ratelimitd.policy import BUILTIN_SCOPES, Identity, Limit, PrefixLengths, Subject


def block_guards(plan: Sequence[tuple[Subject, Sequence[Limit]]], who: Identity,
                 prefixes: PrefixLengths) -> list[Subject]:
    """The subjects whose blocks apply to this reserve and that the plan does not visit."""
    wanted: list[Subject] = []
    if who.key_id is not None:
        wanted.append(Subject("key", who.key_id))
    if who.org is not None:
        wanted.append(Subject("org", who.org))
    for name, value in who.attributes.items():
        if name == "ip":
            wanted += ip_block_subjects(value, prefixes.ipv4, prefixes.ipv6)
        elif name not in BUILTIN_SCOPES:   # an attribute cannot stand for a user, org or key
            wanted.append(Subject(name, value))
    visited = {subject for subject, _ in plan}
    return [s for s in dict.fromkeys(wanted) if s not in visited]


def blocked_error(subject: Subject, retry_after_ms: int, reason: str) -> ApiError:
    """403 blocked, with Retry-After (whole seconds, rounded up) and the block's reason."""
    seconds = max(1, math.ceil(retry_after_ms / 1000))
    return ApiError(403, "blocked",
                    f"{subject.scope} {subject.id} is blocked for {seconds} s more: {reason}",
                    {"Retry-After": str(seconds)})
