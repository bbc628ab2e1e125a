"""The OpenAPI 3.1 description of the HTTP API, served at /openapi.json.

tests/test_openapi.py checks every route against it and validates real answers against its
schemas, so it stays true to what the server does.
"""

from __future__ import annotations

import copy
from typing import Any, Final

from ratelimitd import __version__
from ratelimitd.abuse.blocks import MAX_REASON_CHARS, MAX_TTL_S
from ratelimitd.config import Config
from ratelimitd.http import usage
from ratelimitd.http.schema import (
    ATTRIBUTE_NAME,
    MAX_API_KEY_CHARS,
    MAX_ATTRIBUTES,
    MAX_ID_CHARS,
    MAX_MESSAGES,
    MAX_RESERVATION_ID_CHARS,
    MAX_TOKENS,
)
from ratelimitd.tokenize.chat import MAX_IMAGE_SIDE, MAX_TOOLS

_JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {_JSON: {"schema": _ref(name)}}}


def _answer(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": _ref(schema)}}}


_REPLICATED: Final[dict[str, Any]] = {
    "type": "boolean", "description": "only with [redis] replicas_ack: whether that many "
    "replicas acknowledged the write in time; false is still done (applied on the primary), "
    "only not yet known to survive a failover: do not retry"}


def _errors(*pairs: tuple[int, str]) -> dict[str, Any]:
    """One answer per status, listing every code given for it (in the order given)."""
    codes: dict[int, list[str]] = {}
    for status, listed in pairs:
        for code in listed.split(", "):
            if code not in codes.setdefault(status, []):
                codes[status].append(code)
    return {str(status): _answer(f"error; codes: {', '.join(names)}", "Error")
            for status, names in codes.items()}


_AUTH_ERRORS = (401, "missing_credentials, invalid_service_token")
_ADMIN_AUTH = ((401, "missing_credentials, invalid_admin_token"),
               (403, "admin_token_required"))
_BODY_ERRORS = (413, "body_too_large")
_MEDIA_ERRORS = (415, "unsupported_media_type")
_TIMEOUT_ERRORS = (408, "request_timeout")
_BACKEND = (503, "backend_unavailable")

# the bounds are schema.py's (and chat.py's, blocks.py's): the description cannot drift
_COUNT = {"type": "integer", "minimum": 0, "maximum": MAX_TOKENS}
_NULLABLE_COUNT = {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_TOKENS}
_CAP = {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_TOKENS}
# identifiers: 1-256 characters, no control characters (schema.py's _text)
_NO_CONTROL = "^[^\\u0000-\\u001f\\u007f]*$"
_ID = {"type": "string", "minLength": 1, "maxLength": MAX_ID_CHARS, "pattern": _NO_CONTROL}
_NULLABLE_ID = {**_ID, "type": ["string", "null"]}
_NON_BLANK = "\\S"

# the rate-limit headers of a reserve's answers
_RATELIMIT_HEADERS: dict[str, Any] = {
    "RateLimit-Policy": {"description": "IETF draft: each limit's quota (q, capped at "
                         "999999999999999), window (w, seconds) and unit (qu)",
                         "schema": {"type": "string"}},
    "RateLimit": {"description": "IETF draft: each limit's remaining (r) and seconds to reset "
                  "(t)", "schema": {"type": "string"}},
    "x-ratelimit-limit-requests": {"schema": {"type": "string"}},
    "x-ratelimit-remaining-requests": {"schema": {"type": "string"}},
    "x-ratelimit-reset-requests": {"schema": {"type": "string"}},
    "x-ratelimit-limit-tokens": {"schema": {"type": "string"}},
    "x-ratelimit-remaining-tokens": {"schema": {"type": "string"}},
    "x-ratelimit-reset-tokens": {"schema": {"type": "string"}},
}
_RETRY_AFTER: dict[str, Any] = {
    "Retry-After": {"required": True, "description": "whole seconds, rounded up; for "
                    "max_concurrent the latest a slot surely frees (a reservation's TTL)",
                    "schema": {"type": "string", "pattern": "^[0-9]+$"}}}

_RID = {"type": "string", "minLength": 1, "maxLength": MAX_RESERVATION_ID_CHARS,
        "pattern": _NO_CONTROL}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"], "additionalProperties": False,
        "properties": {"error": {
            "type": "object", "required": ["code", "message"], "additionalProperties": False,
            "properties": {"code": {"type": "string", "pattern": "^[a-z_]+$"},
                           "message": {"type": "string"}}}},
    },
    "TextPart": {
        "type": "object", "required": ["type", "text"],
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    },
    "ImagePart": {
        "type": "object", "required": ["type", "image_url"],
        "description": "Counted by OpenAI's tile rule from width and height when given, else "
        "as [tokens] image_tokens (default: the most an image can cost).",
        "properties": {"type": {"const": "image_url"}, "image_url": {
            "type": "object", "required": ["url"],
            "properties": {"url": {"type": "string", "minLength": 1},
                           "detail": {"enum": ["low", "high", "auto"]},
                           "width": {"type": "integer", "minimum": 1, "maximum": MAX_IMAGE_SIDE},
                           "height": {"type": "integer", "minimum": 1,
                                      "maximum": MAX_IMAGE_SIDE}},
            "dependentRequired": {"width": ["height"], "height": ["width"]}}},
    },
    "FunctionCall": {
        "type": "object", "required": ["name", "arguments"],
        "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}},
    },
    "ToolCall": {
        "type": "object", "required": ["function"],
        "properties": {"id": {"type": ["string", "null"]},
                       "type": {"type": ["string", "null"]}, "function": _ref("FunctionCall")},
    },
    "Message": {
        "type": "object", "required": ["role"],
        "description": "An OpenAI-style chat message: content is a string, null, or a list of "
        "text and image_url parts; tool_calls and function_call are counted too. Any other "
        "field is a string (name, tool_call_id...) or null.",
        "properties": {
            "role": {"type": "string"},
            "content": {"anyOf": [
                {"type": "string"}, {"type": "null"},
                {"type": "array", "items": {"oneOf": [_ref("TextPart"), _ref("ImagePart")]}}]},
            "tool_calls": {"type": ["array", "null"], "items": _ref("ToolCall")},
            "function_call": {"anyOf": [_ref("FunctionCall"), {"type": "null"}]},
        },
        "additionalProperties": {"type": ["string", "null"]},
    },
    "MessageWithContent": {
        "description": "a message that sends the model something: non-blank text, an image "
        "or a tool call",
        "anyOf": [
            {"required": ["content"], "properties": {"content": {"anyOf": [
                {"type": "string", "pattern": _NON_BLANK},
                {"type": "array", "contains": {"anyOf": [
                    {"required": ["type"], "properties": {"type": {"const": "image_url"}}},
                    {"required": ["text"], "properties": {"text": {
                        "type": "string", "pattern": _NON_BLANK}}}]}}]}}},
            {"required": ["tool_calls"], "properties": {"tool_calls": {
                "type": "array", "minItems": 1}}},
            {"required": ["function_call"], "properties": {"function_call": {
                "type": "object"}}}],
    },
    "Tool": {
        "type": "object", "required": ["type", "function"],
        "description": "An OpenAI tool: counted as the provider renders it (tokenize/chat.py).",
        "properties": {"type": {"const": "function"}, "function": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string", "minLength": 1},
                           "description": {"type": ["string", "null"]},
                           "parameters": {"type": "object"}}}},
    },
    "ReserveRequest": {
        "type": "object", "additionalProperties": False, "required": ["model"],
        "description": "Exactly one of prompt, messages or input_tokens (null is absent); "
        "tools only with messages; either api_key, or user and tier (and org).",
        "anyOf": [
            {"required": ["api_key"], "properties": {
                "api_key": {"type": "string"}, "user": {"type": "null"},
                "tier": {"type": "null"}, "org": {"type": "null"}}},
            {"required": ["user", "tier"], "properties": {
                "api_key": {"type": "null"}, "signature": {"type": "null"}}}],
        "oneOf": [
            {"required": ["prompt"], "properties": {
                "prompt": {"type": "string"}, "messages": {"type": "null"},
                "input_tokens": {"type": "null"}}},
            {"required": ["messages"], "properties": {
                "messages": {"type": "array"}, "prompt": {"type": "null"},
                "input_tokens": {"type": "null"}}},
            {"required": ["input_tokens"], "properties": {
                "input_tokens": {"type": "integer"}, "prompt": {"type": "null"},
                "messages": {"type": "null"}}}],
        "dependentSchemas": {"tools": {"anyOf": [
            {"properties": {"tools": {"type": "null"}}},
            {"required": ["messages"], "properties": {"messages": {"type": "array"}}}]}},
        "properties": {
            "user": _ID, "tier": _ID, "org": _NULLABLE_ID, "model": _ID,
            "prompt": {"type": ["string", "null"], "pattern": _NON_BLANK,
                       "description": "blank (only whitespace): 400 empty_prompt"},
            "messages": {"type": ["array", "null"], "items": _ref("Message"),
                         "minItems": 1, "maxItems": MAX_MESSAGES,
                         "contains": _ref("MessageWithContent")},
            "tools": {"type": ["array", "null"], "items": _ref("Tool"), "minItems": 1,
                      "maxItems": MAX_TOOLS},
            "input_tokens": _NULLABLE_COUNT,
            "max_output_tokens": {**_CAP, "description": "requested cap; default the tier's. "
                                  "Below min_output_tokens it is its own floor: granted as "
                                  "asked, or denied"},
            "min_output_tokens": {**_CAP, "description": "deny when not even this fits; "
                                  "default [reservations] min_output_tokens (16)"},
            "attributes": {"type": ["object", "null"], "maxProperties": MAX_ATTRIBUTES,
                           "propertyNames": {"pattern": f"^{ATTRIBUTE_NAME.pattern}$"},
                           "properties": {"ip": {"anyOf": [
                               {"type": "string", "format": "ipv4"},
                               {"type": "string", "format": "ipv6"}, {"type": "null"}]}},
                           "additionalProperties": _NULLABLE_ID,
                           "description": "scopes for limits: ip (an address), device, ...; "
                           "null is absent"},
            "idempotency_key": {**_NULLABLE_ID, "description": "a retried reserve with the "
                                "same key answers the first reservation, charging nothing more"},
            "dry_run": {"type": "boolean"},
            "api_key": {"type": ["string", "null"], "minLength": 1,
                        "maxLength": MAX_API_KEY_CHARS,
                        "description": "the end user's key (rlk_...): the daemon resolves user, "
                                       "org and tier; excludes user, tier and org"},
            "signature": {"anyOf": [_ref("Signature"), {"type": "null"}]},
        },
    },
    "LimitState": {
        "type": "object", "additionalProperties": False,
        "required": ["name", "scope", "metric", "window", "limit", "remaining", "reset_ms"],
        "properties": {
            "name": {"type": "string"}, "scope": {"type": "string"},
            "metric": {"enum": ["requests", "tokens", "input_tokens", "output_tokens",
                                "cost_usd", "concurrent"]},
            "window": {"type": ["string", "null"], "description": "e.g. 60s, 24h, day"},
            "limit": {"type": "number", "description": "USD for cost_usd"},
            "remaining": {"type": "number", "description": "USD for cost_usd"},
            "reset_ms": {"type": "integer", "minimum": 0,
                         "description": "ms until this limit is back to full"}},
    },
    "Warning": {"type": "object", "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                               "limit": {"type": "string"}}},
    "ReserveAllowed": {
        "type": "object", "additionalProperties": False,
        "required": ["allowed", "reservation_id", "expires_at_ms", "input_tokens",
                     "max_output_tokens", "reserved", "limits", "warnings", "duplicate"],
        "properties": {
            "allowed": {"const": True},
            "reservation_id": {"type": ["string", "null"],
                               "description": "null for dry_run and degraded answers"},
            "expires_at_ms": {"type": ["integer", "null"]},
            "input_tokens": {"type": "integer"},
            "max_output_tokens": {"type": "integer", "description": "the cap to pass upstream"},
            "reserved": {"type": "object", "required": ["requests", "tokens", "cost_usd"],
                         "additionalProperties": False,
                         "properties": {"requests": {"type": "integer"},
                                        "tokens": {"type": "integer"},
                                        "cost_usd": {"type": "number"}}},
            "limits": {"type": "array", "items": _ref("LimitState")},
            "warnings": {"type": "array", "items": _ref("Warning")},
            "duplicate": {"type": "boolean",
                          "description": "true when an idempotent retry found the first one"},
            "dry_run": {"const": True},
            "degraded": {"const": True, "description": "Redis unavailable, on_error = allow"},
        },
    },
    "ReserveDenied": {
        "type": "object", "additionalProperties": False,
        "required": ["allowed", "reason", "retry_after_ms", "limits"],
        "properties": {
            "warnings": {"type": "array", "items": _ref("Warning"),
                         "description": "an API key's key_expiring / key_rotated, if any"},
            "allowed": {"const": False},
            "reason": {"type": "string", "description": "name of the limit that denied"},
            "retry_after_ms": {"type": "integer", "minimum": 0,
                               "description": "a call that can never fit is a 400 "
                               "exceeds_limit instead"},
            "message": {"type": "string"},
            "limits": {"type": "array", "items": _ref("LimitState")}},
    },
    "CommitRequest": {
        "type": "object", "additionalProperties": False,
        "required": ["reservation_id", "input_tokens"],
        "description": "Exactly one of output_tokens or output_text (null is absent). "
        "cached_input_tokens counts part of input_tokens: more is a 400.",
        "oneOf": [
            {"required": ["output_tokens"], "properties": {
                "output_tokens": {"type": "integer"}, "output_text": {"type": "null"}}},
            {"required": ["output_text"], "properties": {
                "output_text": {"type": "string"}, "output_tokens": {"type": "null"}}}],
        "properties": {
            "reservation_id": _RID, "input_tokens": _COUNT,
            "output_tokens": _NULLABLE_COUNT, "output_text": {"type": ["string", "null"]},
            "cached_input_tokens": {**_NULLABLE_COUNT, "description": "part of input_tokens"},
            "model": {**_NULLABLE_ID, "description": "tokenizer for output_text; default "
                      "encoding otherwise"}},
    },
    "CommitResponse": {
        "type": "object", "additionalProperties": False,
        "required": ["committed", "duplicate", "cost_usd", "usage", "alerts"],
        "properties": {
            "committed": {"const": True}, "duplicate": {"type": "boolean"},
            "cost_usd": {"type": "number"},
            "usage": {"type": "object", "additionalProperties": False,
                      "required": ["input_tokens", "cached_input_tokens", "output_tokens"],
                      "properties": {"input_tokens": {"type": "integer"},
                                     "cached_input_tokens": {"type": "integer"},
                                     "output_tokens": {"type": "integer"}}},
            "alerts": {"type": "array", "items": {"type": "object"}},
            "replicated": _REPLICATED,
            "overrun": {"type": "object", "required": ["tokens", "cost_usd"],
                        "properties": {"tokens": {"type": "integer"},
                                       "cost_usd": {"type": "number"}}}},
    },
    "ReleaseRequest": {"type": "object", "additionalProperties": False,
                       "required": ["reservation_id"],
                       "properties": {"reservation_id": _RID}},
    "ReleaseResponse": {"type": "object", "additionalProperties": False,
                        "required": ["released", "duplicate"],
                        "properties": {"released": {"const": True},
                                       "duplicate": {"type": "boolean"},
                                       "replicated": _REPLICATED}},
    "Health": {"type": "object", "required": ["status"],
               "properties": {"status": {"enum": ["ok", "embedded_redis_down"]},
                              "redis": {"type": "string"}}},
    "Ready": {"type": "object", "required": ["ready"],
              "properties": {"ready": {"type": "boolean"}, "redis": {"type": "string"},
                             "scripts": {"type": "string"}, "config": {"type": "string"}}},
}


_KEY_ID = {"type": "string", "pattern": "^key_[0-9A-Za-z]{17}$"}
_MS = {"type": "integer"}
_SCHEMAS.update({
    "Signature": {
        "type": "object", "additionalProperties": False,
        "required": ["timestamp", "nonce", "method", "path", "body_sha256", "value"],
        "description": "The client's signature, forwarded by the gateway: value = hex "
                       "HMAC-SHA256(signing_secret, \"v1\\n{timestamp}\\n{nonce}\\n{method}\\n"
                       "{path}\\n{body_sha256}\"); "
                       "ratelimitd.auth.signatures.sign_request makes it",
        "properties": {
            "timestamp": {"type": "integer", "description": "unix seconds"},
            "nonce": {"type": "string", "pattern": "^[A-Za-z0-9_.~-]{16,128}$"},
            "method": {"type": "string", "pattern": "^[A-Z]{1,16}$"},
            "path": {"type": "string"},
            "body_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "value": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}},
    },
    "CreateKeyRequest": {
        "type": "object", "additionalProperties": False, "required": ["user", "tier"],
        "properties": {
            "user": _ID, "tier": _ID, "org": _ID,
            "expires_in_days": {"type": "integer", "minimum": 1,
                                "description": "default and maximum [keys] max_age_days"},
            "require_signature": {"type": "boolean"},
            "attributes": {"type": "object", "additionalProperties": _ID,
                           "description": "the end user's ip: creations are limited per "
                                          "ip_prefix ([keys] creations_per_ip_prefix_per_hour)"}},
    },
    "CreatedKey": {
        "type": "object", "additionalProperties": False,
        "required": ["key_id", "api_key", "expires_at_ms"],
        "description": "the only time the key (and signing secret) is shown",
        "properties": {"key_id": _KEY_ID, "api_key": {"type": "string", "pattern": "^rlk_"},
                       "expires_at_ms": {"type": ["integer", "null"]},
                       "signing_secret": {"type": "string"}},
    },
    "RotateKeyRequest": {
        "type": "object", "additionalProperties": False,
        "properties": {"grace_s": {"type": "integer", "minimum": 0, "description":
                                   "the old key keeps working this long; default [keys] "
                                   "rotation_grace_s"}},
    },
    "RotatedKey": {
        "type": "object", "additionalProperties": False,
        "required": ["key_id", "api_key", "expires_at_ms", "old_key_id",
                     "old_key_expires_at_ms"],
        "properties": {"key_id": _KEY_ID, "api_key": {"type": "string", "pattern": "^rlk_"},
                       "expires_at_ms": {"type": ["integer", "null"]}, "old_key_id": _KEY_ID,
                       "old_key_expires_at_ms": _MS, "signing_secret": {"type": "string"}},
    },
    "Revoked": {"type": "object", "additionalProperties": False, "required": ["revoked"],
                "properties": {"revoked": {"const": True}}},
    "KeyInfo": {
        "type": "object", "additionalProperties": False,
        "required": ["key_id", "user", "org", "tier", "state", "created_at_ms",
                     "expires_at_ms", "revoked_at_ms", "rotated_to", "rotated_from",
                     "require_signature"],
        "description": "a key's metadata: never the key, its hash or its signing secret",
        "properties": {
            "key_id": _KEY_ID, "user": {"type": "string"}, "org": {"type": ["string", "null"]},
            "tier": {"type": "string"},
            "state": {"enum": ["active", "rotated", "expired", "revoked"]},
            "created_at_ms": _MS, "expires_at_ms": {"type": ["integer", "null"]},
            "revoked_at_ms": {"type": ["integer", "null"]},
            "rotated_to": {"type": ["string", "null"]},
            "rotated_from": {"type": ["string", "null"]},
            "require_signature": {"type": "boolean"}},
    },
    "BlockRequest": {
        "type": "object", "additionalProperties": False,
        "required": ["scope", "id", "ttl_s", "reason"],
        "properties": {
            "scope": {"type": "string", "description": "key, user, org, ip, ip_prefix or an "
                                                       "attribute name (not global)"},
            "id": _ID, "ttl_s": {"type": "integer", "minimum": 1, "maximum": MAX_TTL_S},
            "reason": {"type": "string", "minLength": 1, "maxLength": MAX_REASON_CHARS}},
    },
    "Block": {
        "type": "object", "additionalProperties": False,
        "required": ["scope", "id", "expires_at_ms", "reason"],
        "properties": {"scope": {"type": "string"}, "id": {"type": "string"},
                       "expires_at_ms": _MS, "reason": {"type": "string"}},
    },
    "BlockRemoved": {"type": "object", "additionalProperties": False, "required": ["removed"],
                     "properties": {"removed": {"type": "boolean",
                                                "description": "false: it had no block"}}},
    "BlockList": {"type": "object", "additionalProperties": False, "required": ["blocks"],
                  "properties": {"blocks": {"type": "array", "items": _ref("Block")}}},
})


def _admin(method: str, summary: str, answers: dict[str, Any], *errors: tuple[int, str],
           body: str | None = None, parameters: list[dict[str, Any]] | None = None
           ) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary, "security": [{"adminToken": []}],
        "responses": {**answers, **_errors(*_ADMIN_AUTH, *errors, _BACKEND)}}
    if body is not None:
        op["requestBody"] = _body(body)
    if parameters:
        op["parameters"] = parameters
    return {method: op}


def _param(name: str, where: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path" or name != "limit",
            "description": description, "schema": {"type": "string"}}


_KEY_PARAM = [_param("key_id", "path", "the key's id (key_...), never the key")]
_NO_PEPPER = (503, "backend_unavailable, keys_unavailable")
_BLOCK_QUERY = [_param("scope", "query", "the blocked subject's scope"),
                _param("id", "query", "the blocked subject's id")]


def _admin_paths() -> dict[str, Any]:
    key_errors = ((404, "key_not_found"), _NO_PEPPER)
    return {
        "/v1/admin/keys": _admin(
            "post", "Create an API key (shown only in this answer)",
            {"201": _answer("created", "CreatedKey")},
            (400, "invalid_request"), (403, "blocked"), (429, "too_many_key_creations"),
            _BODY_ERRORS, _NO_PEPPER, body="CreateKeyRequest"),
        "/v1/admin/keys/{key_id}/rotate": _admin(
            "post", "A new key for the same user; the old one works grace_s more",
            {"201": _answer("rotated", "RotatedKey")}, (400, "invalid_request"),
            (409, "key_revoked, key_rotated, key_expired"), *key_errors,
            parameters=_KEY_PARAM),
        "/v1/admin/keys/{key_id}/revoke": _admin(
            "post", "Revoke a key: every daemon refuses it within 1 s",
            {"200": _answer("revoked (a repeat answers the same)", "Revoked")},
            (400, "invalid_request"), *key_errors, parameters=_KEY_PARAM),
        "/v1/admin/keys/{key_id}": _admin(
            "get", "A key's metadata", {"200": _answer("the metadata", "KeyInfo")},
            *key_errors, parameters=_KEY_PARAM),
        "/v1/admin/blocks": {
            **_admin("post", "Block a subject for ttl_s: its reserves answer 403 blocked",
                     {"201": _answer("blocked", "Block")}, (400, "invalid_request"),
                     _BODY_ERRORS, body="BlockRequest"),
            **_admin("delete", "Lift a subject's block",
                     {"200": _answer("lifted", "BlockRemoved")}, (400, "invalid_request"),
                     parameters=_BLOCK_QUERY),
            **_admin("get", "The blocks in force, soonest to end first",
                     {"200": _answer("the blocks", "BlockList")}, (400, "invalid_request"),
                     parameters=[_param("limit", "query", "at most this many (default "
                                                          "1000)")])},
    }


def _settle_path(summary: str, schemas: str, done: str, conflict: str,
                 security: list[dict[str, list[str]]]) -> dict[str, Any]:
    """/v1/commit and /v1/release: the same shape, with their own schemas and 409 code."""
    return {"post": {
        "summary": summary, "security": security,
        "requestBody": _body(f"{schemas}Request"),
        "responses": {"200": _answer(f"{done} (or a repeat)", f"{schemas}Response"),
                      **_errors((400, "invalid_request, invalid_body"), *_auth(security),
                                (404, "reservation_not_found"), (409, conflict), _BODY_ERRORS,
                                _TIMEOUT_ERRORS, _MEDIA_ERRORS, _BACKEND)}}}


def _auth(security: list[dict[str, list[str]]]) -> tuple[tuple[int, str], ...]:
    return (_AUTH_ERRORS,) if security else ()


def _probe(summary: str, answers: dict[str, Any]) -> dict[str, Any]:
    """GET and HEAD (the same answer without a body) of a probe."""
    head = {status: {"description": answer["description"]} for status, answer in answers.items()}
    return {"get": {"summary": summary, "responses": answers},
            "head": {"summary": f"{summary} (no body)", "responses": head}}


def openapi_spec(config: Config | None = None) -> dict[str, Any]:
    """The API as this configuration serves it: bearer auth only when service tokens are
    configured, and the tier a reserve names one of its tiers."""
    config = config or Config()
    secured: list[dict[str, list[str]]] = (
        [{"serviceToken": []}] if config.server.service_tokens else [])
    schemas = copy.deepcopy(_SCHEMAS)
    schemas["ReserveRequest"]["properties"]["tier"] = {
        "enum": list(config.tiers), "description": "a tier of the configuration"}
    reserve_answers = {
        "200": {**_answer("allowed", "ReserveAllowed"), "headers": _RATELIMIT_HEADERS},
        "429": {**_answer("denied; retry after Retry-After", "ReserveDenied"),
                "headers": {**_RETRY_AFTER, **_RATELIMIT_HEADERS}},
        **_errors((400, "invalid_request, invalid_body, empty_prompt, prompt_too_long, "
                   "too_many_input_tokens, unknown_model, exceeds_limit"),
                  (401, "missing_credentials, invalid_service_token, invalid_api_key, "
                        "invalid_signature"),
                  (403, "key_revoked, key_expired, blocked"),
                  (409, "idempotency_key_in_use"),
                  (422, "idempotency_key_reused"), _BODY_ERRORS, _TIMEOUT_ERRORS,
                  _MEDIA_ERRORS, (503, "backend_unavailable, keys_unavailable"))}
    spec: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "ratelimitd", "version": __version__,
                 "description": "Rate-limit and budget decisions for LLM API calls."},
        "components": {
            "schemas": {**schemas, **usage.OPENAPI_SCHEMAS},
            "securitySchemes": {"adminToken": {
                "type": "http", "scheme": "bearer",
                "description": "[server] admin_tokens; always required on /v1/admin/*"}},
        },
        "paths": {
            "/v1/reserve": {"post": {
                "summary": "Check and reserve a call's estimated usage on every limit",
                "security": secured, "requestBody": _body("ReserveRequest"),
                "responses": reserve_answers}},
            "/v1/commit": _settle_path("Replace the estimate by the actual usage", "Commit",
                                       "committed", "reservation_released", secured),
            "/v1/release": _settle_path("Refund a call that never happened", "Release",
                                        "released", "reservation_committed", secured),
            "/healthz": _probe("The process is up (and its embedded Redis runs)", {
                "200": _answer("up", "Health"),
                "503": _answer("the embedded redis-server is down", "Health")}),
            "/readyz": _probe("Redis reachable, scripts loaded, config valid", {
                "200": _answer("ready", "Ready"), "503": _answer("not ready", "Ready")}),
            "/openapi.json": _probe("This document", {"200": {
                "description": "OpenAPI 3.1", "content": {_JSON: {"schema": {
                    "type": "object"}}}}}),
            "/metrics": _probe("Prometheus metrics, summed over the workers (no token: "
                               "counts by tier, model and route, never a user, key or ip)", {
                "200": {"description": "Prometheus text format 0.0.4", "content": {
                    "text/plain": {"schema": {"type": "string"}}}}}),
            **_admin_paths(),
            "/v1/admin/usage": usage.OPENAPI_PATH,
        },
    }
    if secured:
        spec["components"]["securitySchemes"]["serviceToken"] = {
            "type": "http", "scheme": "bearer",
            "description": "one of [server] service_tokens"}
    return spec
