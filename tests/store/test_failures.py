"""The driver's failures as StoreUnavailable (failures.py), the one mapping every caller of the
redis-py client uses."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from ratelimitd.errors import StoreReplyError, StoreUnavailable
from ratelimitd.store.failures import failure_name, store_error, store_failures


def test_an_error_reply_is_a_reply_error_with_its_text() -> None:
    failure = store_error(ResponseError("NOGROUP no such group"))
    assert isinstance(failure, StoreReplyError) and str(failure) == "NOGROUP no such group"


def test_a_timeout_may_have_run_and_a_lost_connection_names_its_kind() -> None:
    assert store_error(TimeoutError()).timeout
    lost = store_error(RedisConnectionError("refused"))
    assert type(lost) is StoreUnavailable and not lost.timeout
    assert str(lost) == "ConnectionError: refused"


async def test_the_block_turns_driver_failures_into_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable) as caught:
        async with store_failures():
            raise RedisConnectionError("refused")
    assert failure_name(caught.value) == "ConnectionError"
    with pytest.raises(ValueError):  # not a driver failure: left as it is
        async with store_failures():
            raise ValueError("a bug")
