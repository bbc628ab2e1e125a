"""The Redis driver's failures, in one place: which exceptions mean Redis failed a call
(DRIVER_FAILURES), and how one becomes our StoreUnavailable (`store_error`; Redis' error reply
is a StoreReplyError). Nothing outside store/ names redis-py's exceptions."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Final

from redis.exceptions import RedisError, ResponseError

from ratelimitd.errors import StoreReplyError, StoreUnavailable

# What a redis-py call raises when Redis fails it: the driver's own errors, and the socket's
DRIVER_FAILURES: Final = (RedisError, OSError)


def store_error(exc: BaseException) -> StoreUnavailable:
    """A driver's or a socket's exception as StoreUnavailable."""
    if isinstance(exc, StoreUnavailable):
        return exc
    if isinstance(exc, ResponseError):
        return StoreReplyError(str(exc))
    if isinstance(exc, TimeoutError):
        return StoreUnavailable("Redis did not answer in time", timeout=True)
    return StoreUnavailable(f"{type(exc).__name__}: {exc}")


@contextlib.asynccontextmanager
async def store_failures() -> AsyncIterator[None]:
    """The driver failures of the block as StoreUnavailable, which the HTTP edge answers 503
    backend_unavailable, like the engine's."""
    try:
        yield
    except DRIVER_FAILURES as exc:
        raise store_error(exc) from exc


def failure_name(exc: StoreUnavailable) -> str:
    """The name of the driver's failure under `exc` (ConnectionError, TimeoutError...), for
    logs."""
    return type(exc.__cause__ if exc.__cause__ is not None else exc).__name__
