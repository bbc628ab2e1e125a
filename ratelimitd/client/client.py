"""The async client: reserve, commit, release over ratelimitd's HTTP API, and `guard`.

One aiohttp session per client (connections are reused), a timeout per attempt, and bounded
retries with jittered exponential backoff on what a retry can fix: a 503 (or a proxy's 502 or
504) and no answer at all (refused, reset, timed out). Retries are safe by the API's
exactly-once promise: a reserve is always sent with an idempotency key (the caller's, else one
generated per call) and every attempt reuses it, and commits and releases are idempotent.
A 4xx is never retried.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import aiohttp

from ratelimitd.client.errors import (
    DaemonUnreachable,
    RatelimitdError,
    RateLimited,
    ServerError,
    error_from_answer,
)
from ratelimitd.client.results import CommitResult, ReleaseResult, Reservation, denial

log = logging.getLogger("ratelimitd.client")
_T = TypeVar("_T")

# What a retry can fix: no answer, a broken answer, a 503 (the daemon's Redis did not answer),
# a 502 or 504 (a proxy in front of the daemons could not reach one).
_RETRYABLE_ERRORS: Final = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                            TimeoutError)
_RETRYABLE_STATUSES: Final = frozenset({502, 503, 504})
_UNIX_PREFIX: Final = "unix:"


class RatelimitdClient:
    """An async client for one ratelimitd deployment (any of its daemons behind `url`).

    `url` is "http://host:port" (or "unix:/path/to.sock"); `service_token` is sent as
    `Authorization: Bearer` when the daemon has `[server] service_tokens`. Each attempt is
    bounded by `timeout_s`; `retries` more attempts follow a 5xx that a retry can fix (502,
    503, 504) or a failed connection, after
    `backoff_s`, 2x, 4x... (at most `max_backoff_s`, jittered). Use one client per process and
    close it (`async with RatelimitdClient(...) as rl:` or `await rl.close()`).

    The five-line integration (see `guard`)::

        async with RatelimitdClient("http://127.0.0.1:8080", service_token=TOKEN) as rl:
            async with rl.guard(api_key=key, model="gpt-4o", messages=msgs) as call:
                reply = await openai.chat.completions.create(
                    model="gpt-4o", messages=msgs, max_completion_tokens=call.max_output_tokens)
                call.set_usage(reply.usage.prompt_tokens, reply.usage.completion_tokens)
    """

    def __init__(self, url: str, *, service_token: str | None = None, timeout_s: float = 2.0,
                 retries: int = 2, backoff_s: float = 0.05, max_backoff_s: float = 1.0,
                 max_connections: int = 100,
                 session: aiohttp.ClientSession | None = None) -> None:
        if retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError("retries and backoff_s must be >= 0, timeout_s > 0")
        self._socket_path = url[len(_UNIX_PREFIX):] if url.startswith(_UNIX_PREFIX) else None
        self._base = "http://localhost" if self._socket_path else url.rstrip("/")
        self._headers = {"Content-Type": "application/json"}
        if service_token:
            self._headers["Authorization"] = f"Bearer {service_token}"
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._retries = retries
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._max_connections = max_connections
        self._session = session
        self._owns_session = session is None
        self._jitter = random.Random()  # noqa: S311  (backoff jitter: nothing secret)
        # settles (commit/release) that outlived a cancelled caller; awaited by close()
        self._settling: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Waits for settles still running (each bounded by the retries), closes the session."""
        while self._settling:  # a settle may start another (a late reserve's release)
            await asyncio.gather(*self._settling, return_exceptions=True)
        if self._session is not None and self._owns_session:
            await self._session.close()
        self._session = None

    # -- the three calls -----------------------------------------------------------------------

    async def reserve(self, *, model: str, api_key: str | None = None, user: str | None = None,
                      tier: str | None = None, org: str | None = None,
                      prompt: str | None = None,
                      messages: Sequence[Mapping[str, Any]] | None = None,
                      tools: Sequence[Mapping[str, Any]] | None = None,
                      input_tokens: int | None = None, max_output_tokens: int | None = None,
                      min_output_tokens: int | None = None,
                      attributes: Mapping[str, str] | None = None,
                      idempotency_key: str | None = None, dry_run: bool = False,
                      signature: Mapping[str, Any] | None = None) -> Reservation:
        """Reserve before a model call. Identity: `api_key`, or `user` + `tier` (+ `org`) the
        gateway verified itself. Content: one of `prompt`, `messages` (with the request's
        `tools`, counted as the provider counts them), `input_tokens`.

        `idempotency_key`: leave it out and one is made for this call (its retries reuse
        it). If you give one, make it unique per model call and never let your callers
        choose it: a key used again after its reservation was settled gets that reservation
        back (duplicate=True), and its commit is then a duplicate too, so the call is free.

        Returns the Reservation (its `max_output_tokens` is the cap to send upstream); raises
        RateLimited when denied, InvalidRequest, AuthError, Blocked, or Unavailable."""
        if idempotency_key is None and not dry_run:
            idempotency_key = new_idempotency_key()  # every retry reuses it
        body = _without_none({
            "api_key": api_key, "user": user, "tier": tier, "org": org, "model": model,
            "prompt": prompt, "messages": messages, "tools": tools, "input_tokens": input_tokens,
            "max_output_tokens": max_output_tokens, "min_output_tokens": min_output_tokens,
            "attributes": attributes, "idempotency_key": idempotency_key,
            "signature": signature, "dry_run": dry_run or None})
        status, data, headers = await self._post("/v1/reserve", body)
        if status == 200:
            return Reservation.from_json(data, headers, idempotency_key)
        if status == 429:
            raise denial(data, headers)
        raise error_from_answer(status, data, headers)

    async def commit(self, reservation_id: str, *, input_tokens: int,
                     output_tokens: int | None = None, output_text: str | None = None,
                     cached_input_tokens: int = 0, model: str | None = None) -> CommitResult:
        """Settle a reservation with the call's actual usage. Give `output_tokens`, or
        `output_text` for the daemon to count (with `model`'s tokenizer: for a stream that
        broke before the provider reported usage). Safe to repeat."""
        if (output_tokens is None) == (output_text is None):
            raise ValueError("give exactly one of output_tokens and output_text")
        body = _without_none({
            "reservation_id": reservation_id, "input_tokens": input_tokens,
            "output_tokens": output_tokens, "output_text": output_text,
            "cached_input_tokens": cached_input_tokens or None, "model": model})
        status, data, headers = await self._post("/v1/commit", body)
        if status == 200:
            return CommitResult.from_json(data)
        raise error_from_answer(status, data, headers)

    async def release(self, reservation_id: str) -> ReleaseResult:
        """The call never happened: refund the reservation and free its slot. Safe to repeat."""
        status, data, headers = await self._post("/v1/release",
                                                  {"reservation_id": reservation_id})
        if status == 200:
            return ReleaseResult.from_json(data)
        raise error_from_answer(status, data, headers)

    def guard(self, *, model: str, strict: bool = False, **reserve_args: Any) -> Guard:
        """`async with client.guard(...) as call:` reserves on enter (the arguments of
        `reserve`), commits on a normal exit what the block set with `call.set_usage(...)`
        or `call.set_output_text(...)`, and releases on an exception or a cancellation.
        A settle failure on the success path is logged and kept in `call.settle_error`, so
        a call that happened is not reported as failed; `strict=True` raises it instead."""
        return Guard(self, model, reserve_args, strict)

    # -- work that must outlive a cancelled caller ---------------------------------------------

    def finish_later(self, call: Awaitable[Any]) -> None:
        """Run `call` in a task that close() waits for; a failure is logged. For settles
        whose caller was cancelled: they are repeat-safe, so they are simply sent again."""
        task = asyncio.ensure_future(call)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        task.add_done_callback(_log_failure)

    # -- HTTP ----------------------------------------------------------------------------------

    async def _post(self, path: str, body: Mapping[str, Any]
                    ) -> tuple[int, Any, Mapping[str, str]]:
        payload = json.dumps(body, separators=(",", ":")).encode()
        session = self._get_session()
        attempt = 0
        while True:
            failure: RatelimitdError
            try:
                async with session.post(self._base + path, data=payload, headers=self._headers,
                                        timeout=self._timeout) as resp:
                    raw = await resp.read()
                    status, headers = resp.status, dict(resp.headers)
            except _RETRYABLE_ERRORS as exc:
                failure = DaemonUnreachable(
                    f"no answer from ratelimitd at {self._base}{path}: "
                    f"{type(exc).__name__} {exc}".rstrip())
            else:
                data = _decode(raw, status)
                if status not in _RETRYABLE_STATUSES:
                    return status, data, headers
                failure = error_from_answer(status, data, headers)
            if attempt >= self._retries:
                raise failure
            delay = self._delay(attempt)
            attempt += 1
            log.debug("ratelimitd %s failed (%s); attempt %d in %.3f s", path, failure,
                      attempt + 1, delay)
            await asyncio.sleep(delay)

    def _delay(self, attempt: int) -> float:
        """Exponential backoff with "equal jitter": half fixed, half random, so daemons that
        failed together do not all come back at the same moment."""
        ceiling = min(self._max_backoff_s, self._backoff_s * 2.0 ** attempt)
        return ceiling / 2 + self._jitter.uniform(0, ceiling / 2)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector: aiohttp.BaseConnector = (
                aiohttp.UnixConnector(path=self._socket_path, limit=self._max_connections)
                if self._socket_path else aiohttp.TCPConnector(limit=self._max_connections))
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session


class Guard:
    """One model call's reservation, as an async context manager (made by client.guard()).

    On enter: reserve (RateLimited and the other errors propagate; nothing is held then).
    In the block: `call.max_output_tokens` is the cap to send upstream; tell the actual usage
    with `set_usage()`, or `set_output_text()`; `discard()` if the call did not happen.
    On exit: commit the usage (the reservation's estimate, with a warning, if none was set),
    or release on an exception, a cancellation or discard().

    Cancellation never leaves a reservation behind, and costs nothing when it does not happen
    (no extra tasks): every call involved is repeat-safe, so a cancelled one is sent again in
    the background (and close() waits for it). A settle is sent again as it was; a reserve
    cancelled in flight may still land, so it is sent again with the same idempotency key,
    which finds the first one (or makes it), and what it gets is released.
    """

    def __init__(self, client: RatelimitdClient, model: str, reserve_args: Mapping[str, Any],
                 strict: bool) -> None:
        self._client = client
        self._model = model
        self._reserve_args = reserve_args
        self._strict = strict
        self._usage: dict[str, Any] | None = None
        self._discarded = False
        self._reservation: Reservation | None = None
        self.commit_result: CommitResult | None = None
        self.release_result: ReleaseResult | None = None
        self.settle_error: RatelimitdError | None = None

    @property
    def reservation(self) -> Reservation:
        if self._reservation is None:
            raise RuntimeError("no reservation: use the guard as `async with ... as call`")
        return self._reservation

    @property
    def max_output_tokens(self) -> int:
        """The granted output cap: pass it upstream (max_tokens / max_completion_tokens)."""
        return self.reservation.max_output_tokens

    def set_usage(self, input_tokens: int, output_tokens: int,
                  cached_input_tokens: int = 0) -> None:
        """The provider's reported usage, committed on exit."""
        self._usage = {"input_tokens": input_tokens, "output_tokens": output_tokens,
                       "cached_input_tokens": cached_input_tokens}

    def set_output_text(self, output_text: str, input_tokens: int | None = None) -> None:
        """No reported usage (a stream that broke): the daemon counts `output_text` with the
        model's tokenizer; input defaults to the prompt's count at reserve time."""
        self._usage = {"output_text": output_text, "model": self._model,
                       "input_tokens": (self.reservation.input_tokens if input_tokens is None
                                        else input_tokens)}

    def discard(self) -> None:
        """The model call did not happen (the provider refused it...): release on exit."""
        self._discarded = True

    async def __aenter__(self) -> Self:
        args = dict(self._reserve_args)
        if args.get("idempotency_key") is None and not args.get("dry_run"):
            args["idempotency_key"] = new_idempotency_key()  # known here, for an undo
        self._reserve_args = args
        try:
            self._reservation = await self._client.reserve(model=self._model, **args)
        except asyncio.CancelledError:
            self._client.finish_later(self._undo_reserve())
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        rid = self.reservation.reservation_id
        if rid is None:  # a dry run or a degraded admission: nothing was reserved
            return
        try:
            if exc_type is None and not self._discarded:
                usage = self._commit_usage()
                self.commit_result = await self._settle(lambda: self._client.commit(rid, **usage))
            else:
                self.release_result = await self._settle(lambda: self._client.release(rid))
        except RatelimitdError as err:
            self.settle_error = err
            if self._strict and exc_type is None:
                raise
            # Not raised over the block's own outcome: the reservation expires on its own
            # ([reservations] ttl_s), keeping its estimate charged, which is conservative.
            log.warning("ratelimitd: could not settle %s: %s", rid, err)

    def _commit_usage(self) -> dict[str, Any]:
        if self._usage is None:
            log.warning("ratelimitd: no usage set for %s; committing the reserved estimate",
                        self.reservation.reservation_id)
            return {"input_tokens": self.reservation.input_tokens,
                    "output_tokens": self.reservation.max_output_tokens}
        return self._usage

    async def _settle(self, send: Callable[[], Awaitable[_T]]) -> _T:
        try:
            return await send()
        except asyncio.CancelledError:
            self._client.finish_later(send())  # repeat-safe: send it again, to the end
            raise

    async def _undo_reserve(self) -> None:
        """After a cancelled reserve: the same reserve again (exactly once by its key), then
        release what it holds. Denied: then the first never landed either."""
        try:
            again = await self._client.reserve(model=self._model, **self._reserve_args)
        except RateLimited:
            return
        if again.reservation_id is not None:
            await self._client.release(again.reservation_id)


def new_idempotency_key() -> str:
    return "rlc_" + secrets.token_urlsafe(18)


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("ratelimitd: a settle after a cancellation failed: %s", task.exception())


def _without_none(body: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if v is not None}


def _decode(raw: bytes, status: int) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        if status < 300:
            raise ServerError(f"the answer is not JSON: {raw[:200]!r}", status=status) from None
        return None  # an error page from a proxy: the status tells enough
