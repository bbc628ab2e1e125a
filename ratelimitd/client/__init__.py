"""A client for ratelimitd's HTTP API, for gateways in front of an LLM API.

It needs only aiohttp (it imports nothing of the daemon). The five-line integration::

    from ratelimitd.client import RatelimitdClient, RateLimited

    async with RatelimitdClient("http://127.0.0.1:8080", service_token=TOKEN) as rl:
        async with rl.guard(api_key=key, model="gpt-4o", messages=msgs) as call:
            reply = await llm.chat.completions.create(
                model="gpt-4o", messages=msgs, max_completion_tokens=call.max_output_tokens)
            call.set_usage(reply.usage.prompt_tokens, reply.usage.completion_tokens)

The guard reserves on enter (RateLimited carries `retry_after`), commits the usage on a normal
exit, and releases on an exception or a cancellation. Retries reuse the reserve's
idempotency key, so a retried reserve never charges twice. For scripts there is
SyncRatelimitdClient; examples/openai_gateway.py is a whole OpenAI-compatible gateway on it.
"""

from ratelimitd.client.client import Guard, RatelimitdClient
from ratelimitd.client.errors import (
    AuthError,
    BackendUnavailable,
    Blocked,
    DaemonUnreachable,
    InvalidRequest,
    RatelimitdError,
    RateLimited,
    ReservationConflict,
    ReservationNotFound,
    ServerError,
    Unavailable,
)
from ratelimitd.client.results import (
    CommitResult,
    LimitStatus,
    Notice,
    ReleaseResult,
    Reservation,
)
from ratelimitd.client.sync import SyncRatelimitdClient

__all__ = [
    "AuthError",
    "BackendUnavailable",
    "Blocked",
    "CommitResult",
    "DaemonUnreachable",
    "Guard",
    "InvalidRequest",
    "LimitStatus",
    "Notice",
    "RateLimited",
    "RatelimitdClient",
    "RatelimitdError",
    "ReleaseResult",
    "Reservation",
    "ReservationConflict",
    "ReservationNotFound",
    "ServerError",
    "SyncRatelimitdClient",
    "Unavailable",
]
