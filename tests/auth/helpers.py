"""What the key store's tests share: a resolve's outcome, asserted to be what the test expects."""

from __future__ import annotations

from ratelimitd.auth.keys import KeyFailure, ResolvedKey


def ok(result: ResolvedKey | KeyFailure) -> ResolvedKey:
    assert isinstance(result, ResolvedKey), result
    return result


def failure(result: ResolvedKey | KeyFailure) -> str:
    assert isinstance(result, KeyFailure), result
    return result.reason
