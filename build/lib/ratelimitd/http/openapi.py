"""The OpenAPI 3.1 description of the HTTP API, served at /openapi.json.

tests/test_openapi.py checks every route against it and validates real answers against its
schemas, so it stays true to what the server does.
"""

from __future__ import annotations

from typing import Any

from ratelimitd import __version__

_JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {_JSON: {"schema": _ref(name)}}}


def _answer(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {_JSON: {"schema": _ref(schema)}}}


def _errors(*pairs: tuple[int, str]) -> dict[str, Any]:
    return {str(status): _answer(f"error; codes: {codes}", "Error") for status, codes in pairs}


_AUTH_ERRORS = (401, "missing_credentials, invalid_service_token")
_BODY_ERRORS = (413, "body_too_large")
_BACKEND = (503, "backend_unavailable")

_COUNT = {"type": "integer", "minimum": 0, "maximum": 100_000_000}
_ID = {"type": "string", "minLength": 1, "maxLength": 256}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"], "additionalProperties": False,
        "properties": {"error": {
            "type": "object", "required": ["code", "message"], "additionalProperties": False,
            "properties": {"code": {"type": "string", "pattern": "^[a-z_]+$"},
                           "message": {"type": "string"}}}},
    },
    "Message": {
        "type": "object", "description": "An OpenAI-style chat message; content is a string or "
        "a list of text parts.",
        "properties": {"role": {"type": "string"}, "name": {"type": "string"},
                       "content": {"oneOf": [
                           {"type": "string"}, {"type": "null"},
                           {"type": "array", "items": {
                               "type": "object", "required": ["type", "text"],
                               "properties": {"type": {"const": "text"},
                                              "text": {"type": "string"}}}}]}},
    },
    "ReserveRequest": {
        "type": "object", "additionalProperties": False, "required": ["user", "tier", "model"],
        "description": "Exactly one of prompt, messages or input_tokens.",
        "properties": {
            "user": _ID, "tier": _ID, "org": _ID, "model": _ID,
            "prompt": {"type": "string"},
            "messages": {"type": "array", "items": _ref("Message"), "maxItems": 10000},
            "input_tokens": _COUNT,
            "max_output_tokens": {**_COUNT, "description": "requested cap; default the tier's"},
            "min_output_tokens": {**_COUNT, "description": "deny when not even this fits; "
                                  "default [reservations] min_output_tokens (16)"},
            "attributes": {"type": "object", "maxProperties": 32,
                           "propertyNames": {"pattern": "^[a-z][a-z0-9_]{0,63}$"},
                           "additionalProperties": _ID,
                           "description": "scopes for limits: ip (an address), device, ..."},
            "idempotency_key": {**_ID, "description": "a retried reserve with the same key "
                                "answers the first reservation and charges nothing more"},
            "dry_run": {"type": "boolean"},
            "api_key": {"type": "string", "description": "not available in this build: 400"},
            "signature": {"type": "object", "description": "not available in this build: 400"},
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
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}}},
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
            "allowed": {"const": False},
            "reason": {"type": "string", "description": "name of the limit that denied"},
            "retry_after_ms": {"type": ["integer", "null"],
                               "description": "null: the call can never fit that limit"},
            "message": {"type": "string"},
            "limits": {"type": "array", "items": _ref("LimitState")}},
    },
    "CommitRequest": {
        "type": "object", "additionalProperties": False,
        "required": ["reservation_id", "input_tokens"],
        "description": "Exactly one of output_tokens or output_text.",
        "properties": {
            "reservation_id": {"type": "string"}, "input_tokens": _COUNT,
            "output_tokens": _COUNT, "output_text": {"type": "string"},
            "cached_input_tokens": {**_COUNT, "description": "part of input_tokens"},
            "model": {**_ID, "description": "tokenizer for output_text; default encoding "
                      "otherwise"}},
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
            "overrun": {"type": "object", "required": ["tokens", "cost_usd"],
                        "properties": {"tokens": {"type": "integer"},
                                       "cost_usd": {"type": "number"}}}},
    },
    "ReleaseRequest": {"type": "object", "additionalProperties": False,
                       "required": ["reservation_id"],
                       "properties": {"reservation_id": {"type": "string"}}},
    "ReleaseResponse": {"type": "object", "additionalProperties": False,
                        "required": ["released", "duplicate"],
                        "properties": {"released": {"const": True},
                                       "duplicate": {"type": "boolean"}}},
    "Health": {"type": "object", "required": ["status"],
               "properties": {"status": {"const": "ok"}}},
    "Ready": {"type": "object", "required": ["ready"],
              "properties": {"ready": {"type": "boolean"}, "redis": {"type": "string"},
                             "scripts": {"type": "string"}, "config": {"type": "string"}}},
}


def _settle_path(summary: str, schemas: str, done: str, conflict: str) -> dict[str, Any]:
    """/v1/commit and /v1/release: the same shape, with their own schemas and 409 code."""
    return {"post": {
        "summary": summary, "security": [{"serviceToken": []}],
        "requestBody": _body(f"{schemas}Request"),
        "responses": {"200": _answer(f"{done} (or a repeat)", f"{schemas}Response"),
                      **_errors((400, "invalid_request"), _AUTH_ERRORS,
                                (404, "reservation_not_found"), (409, conflict), _BODY_ERRORS,
                                _BACKEND)}}}


def openapi_spec() -> dict[str, Any]:
    secured: list[dict[str, list[str]]] = [{"serviceToken": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "ratelimitd", "version": __version__,
                 "description": "Rate-limit and budget decisions for LLM API calls."},
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {"serviceToken": {
                "type": "http", "scheme": "bearer",
                "description": "[server] service_tokens; required when any is configured"}},
        },
        "paths": {
            "/v1/reserve": {"post": {
                "summary": "Check and reserve a call's estimated usage on every limit",
                "security": secured, "requestBody": _body("ReserveRequest"),
                "responses": {
                    "200": _answer("allowed; RateLimit-Policy, RateLimit and x-ratelimit-* "
                                   "headers describe the limits", "ReserveAllowed"),
                    "429": _answer("denied; Retry-After, RateLimit-Policy, RateLimit and "
                                   "x-ratelimit-* headers", "ReserveDenied"),
                    **_errors((400, "invalid_request, empty_prompt, prompt_too_long, "
                               "too_many_input_tokens, unknown_model"),
                              _AUTH_ERRORS, _BODY_ERRORS, _BACKEND)}}},
            "/v1/commit": _settle_path("Replace the estimate by the actual usage", "Commit",
                                       "committed", "reservation_released"),
            "/v1/release": _settle_path("Refund a call that never happened", "Release",
                                        "released", "reservation_committed"),
            "/healthz": {"get": {"summary": "The process is up",
                                 "responses": {"200": _answer("up", "Health")}}},
            "/readyz": {"get": {"summary": "Redis reachable, scripts loaded, config valid",
                                "responses": {"200": _answer("ready", "Ready"),
                                              "503": _answer("not ready", "Ready")}}},
            "/openapi.json": {"get": {"summary": "This document",
                                      "responses": {"200": {"description": "OpenAPI 3.1"}}}},
        },
    }
