"""A blocking wrapper for scripts and synchronous code: the async client on a private loop.

    with SyncRatelimitdClient("http://127.0.0.1:8080") as rl:
        with rl.guard(user="u1", tier="free", model="gpt-4o", prompt=text) as call:
            reply = llm(text, max_tokens=call.max_output_tokens)
            call.set_usage(reply.input_tokens, reply.output_tokens)

Not for use inside a running event loop (use RatelimitdClient there), nor from several
threads at once: each instance runs its own loop, one call at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Self

from ratelimitd.client.client import Guard, RatelimitdClient
from ratelimitd.client.results import CommitResult, ReleaseResult, Reservation


class SyncRatelimitdClient:
    """The same calls as RatelimitdClient (same arguments), blocking."""

    def __init__(self, url: str, **options: Any) -> None:
        self._runner = asyncio.Runner()
        self._client = RatelimitdClient(url, **options)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._runner.run(self._client.close())
        finally:
            self._runner.close()

    def reserve(self, **args: Any) -> Reservation:
        return self._runner.run(self._client.reserve(**args))

    def commit(self, reservation_id: str, **args: Any) -> CommitResult:
        return self._runner.run(self._client.commit(reservation_id, **args))

    def release(self, reservation_id: str) -> ReleaseResult:
        return self._runner.run(self._client.release(reservation_id))

    @contextmanager
    def guard(self, **args: Any) -> Iterator[Guard]:
        """As RatelimitdClient.guard: commit on success, release on any exception
        (KeyboardInterrupt included)."""
        guard = self._client.guard(**args)
        self._runner.run(guard.__aenter__())
        try:
            yield guard
        except BaseException as exc:
            self._runner.run(guard.__aexit__(type(exc), exc, exc.__traceback__))
            raise
        self._runner.run(guard.__aexit__(None, None, None))
