"""Every error ratelimitd raises on purpose, in one tree.

    RatelimitdError
    ├── ApiError               an HTTP answer: status, snake_case code, message naming the field
    │   └── ClosingApiError    (http/edge.py) answered, then the connection is closed
    ├── ConfigError            a configuration mistake; the message names the file and the key
    │   ├── ConfigProblem      (config/reader.py) one mistake, with its key and line
    │   └── ConfigProblems     (config/reader.py) every mistake of a file at once
    ├── StoreUnavailable       Redis did not answer, or is unreachable (wraps the driver's
    │   │                      exception, so only store/ and its callers in quota/ know it)
    │   └── StoreReplyError    Redis answered a call with an error reply
    ├── ReserveInProgress      an idempotent retry while the first reserve has not finished
    ├── IdempotencyKeyReused   an idempotency key sent again with another request
    ├── CountingQueueFull      a caller's long prompts waiting to be counted are too many (429)
    ├── TokenCountError        a prompt that cannot be counted (not text)
    ├── EncodingUnavailableError   a tiktoken encoding that cannot load offline
    ├── EmbeddedRedisError     the embedded redis-server cannot start
    ├── ServerBinaryNotFoundError  (store/server_binary.py) no redis-server or valkey-server
    ├── ListenError            an address of [server] listen cannot be listened on
    ├── LuaBuildError          (quota/library.py) the Lua breaks a build rule (file and line)
    ├── PepperError            (auth/keys/pepper.py) a key pepper that is set but unusable
    ├── KeysUnavailableError   (auth/keys/pepper.py) a key feature on a daemon without a pepper
    ├── KeyInputError          (auth/keys/errors.py) a bad argument to a key operation (400)
    ├── KeyNotFoundError       (auth/keys/errors.py) no key has this id (404)
    ├── KeyStateError          (auth/keys/errors.py) the key cannot be rotated in its state (409)
    ├── SignatureError         (auth/signatures.py) a refused request signature (401)
    ├── InvalidIpError         (abuse/ip.py) not an IPv4 or IPv6 address (400)
    ├── BlockInputError        (abuse/blocks.py) a bad argument to a block operation (400)
    ├── AlertDecodeError       (quota/alert_record.py) fields that are not an alert
    ├── CredentialError        (config/credentials.py) a systemd credential missing or empty
    ├── ClientGone             (http/edge.py) the client hung up before its request was read
    ├── NotPlain               (http/lane.py) a request the lane leaves to aiohttp
    └── UsageError             (cli/usage_report.py) the daemon could not be asked, or refused

The client (client/errors.py) draws its own tree: it imports nothing of the daemon.

Each class lives beside the code that raises it when only that code and its callers need it;
the ones many packages share are defined here. Library errors keep the builtin base they had
(ValueError, LookupError, RuntimeError) as a second base, so existing handlers still match.

The command line turns ConfigError, EmbeddedRedisError and ListenError into one line and exit
status 2; the HTTP edge turns StoreUnavailable into 503 backend_unavailable.

ERROR_CODES is the one list of the codes an HTTP answer can carry, with their statuses: the
metrics bound their `reason` label with it, and tests hold docs/errors.md, the OpenAPI
description and every `ApiError` of the code to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

ERROR_CODES: Final[Mapping[str, tuple[int, ...]]] = MappingProxyType({
    "invalid_request": (400,), "invalid_body": (400,), "empty_prompt": (400,),
    "prompt_too_long": (400,), "too_many_input_tokens": (400,), "unknown_model": (400,),
    "exceeds_limit": (400,),
    "missing_credentials": (401,), "invalid_service_token": (401,), "invalid_api_key": (401,),
    "invalid_signature": (401,), "invalid_admin_token": (401,),
    # 409 when an admin rotates a key in that state
    "key_revoked": (403, 409), "key_expired": (403, 409),
    "blocked": (403,), "admin_token_required": (403,),
    "not_found": (404,), "key_not_found": (404,), "reservation_not_found": (404,),
    "method_not_allowed": (405,),
    "request_timeout": (408,),
    "key_rotated": (409,), "reservation_released": (409,), "reservation_committed": (409,),
    "idempotency_key_in_use": (409,),
    "body_too_large": (413,),
    "idempotency_key_reused": (422,),
    "unsupported_media_type": (415,),
    "too_many_key_creations": (429,), "counting_queue_full": (429,),
    "internal_error": (500,),
    "backend_unavailable": (503,), "keys_unavailable": (503,),
})


class RatelimitdError(Exception):
    """The root of every error ratelimitd raises on purpose."""


class ApiError(RatelimitdError):
    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def invalid(field: str, problem: str, code: str = "invalid_request") -> ApiError:
    """A 400 that names the field at fault."""
    return ApiError(400, code, f"{field}: {problem}")


class ConfigError(RatelimitdError, ValueError):
    """A configuration mistake; the message names the file and the key."""


class StoreUnavailable(RatelimitdError):
    """The quota store (Redis) failed a call: timeout, lost connection, or an error reply.

    `timeout` tells a call that may still run in Redis (it was sent, no answer came in time)
    from one that surely did not."""

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


class StoreReplyError(StoreUnavailable):
    """Redis answered with an error reply (a script error, an unknown function...)."""

    @property
    def missing_function(self) -> bool:
        """Redis lost the function library (restart, failover, FUNCTION FLUSH)."""
        return "Function not found" in str(self)


class ReserveInProgress(RatelimitdError):
    """A retry with an idempotency key whose first reserve is still under way (or was cut
    short): it cannot be answered with the first reserve's outcome yet."""


class IdempotencyKeyReused(RatelimitdError):
    """An idempotency key whose first reserve was another request (other subjects or input
    tokens): no retry can be answered with it, so the caller must not retry."""


class TokenCountError(RatelimitdError, ValueError):
    """A prompt that cannot be counted: the message says which part and why."""


class CountingQueueFull(RatelimitdError):
    """A caller already has as many long prompts waiting to be counted as it may."""


class EncodingUnavailableError(RatelimitdError, ValueError):
    """A tiktoken encoding that cannot be loaded without the network."""


class EmbeddedRedisError(RatelimitdError):
    """The embedded redis-server cannot start or keep running."""


class ListenError(RatelimitdError):
    """An address of [server] listen cannot be listened on (in use, no such directory...)."""
