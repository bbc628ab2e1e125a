"""/openapi.json tells the truth: its paths are the server's routes, and real answers of a live
server (over a socket, against a real Redis) validate against its schemas."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from redis.asyncio import Redis

from ratelimitd.config import parse_config
from ratelimitd.errors import ERROR_CODES
from ratelimitd.http import create_app
from ratelimitd.http.openapi import openapi_spec
from ratelimitd.http.schema import COMMIT_FIELDS, RELEASE_FIELDS, RESERVE_FIELDS
from tests.support.http import (
    SMALL_TIER,
    UNKNOWN_RID,
    Serve,
    call,
)
from tests.support.redis_servers import free_port

# the spec of the configuration the answers below come from: tier "t", service tokens set
SPEC = openapi_spec(parse_config({"tiers": {"t": SMALL_TIER},
                                  "server": {"service_tokens": ["tok-0123456789abcdef"]}}))


def validator(schema_name: str) -> Draft202012Validator:
    return Draft202012Validator({**SPEC, "$ref": f"#/components/schemas/{schema_name}"})


def response_schema(method: str, path: str, status: int) -> tuple[str, dict[str, Any]]:
    """The schema name the spec declares for this answer, and the answer's description."""
    responses = SPEC["paths"][path][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {path} answered {status}, not in the spec"
    answer = responses[str(status)]
    ref = answer["content"]["application/json"]["schema"]["$ref"]
    return ref.rsplit("/", 1)[1], answer


def check_answer(method: str, path: str, status: int, body: Any) -> None:
    name, answer = response_schema(method, path, status)
    errors = sorted(validator(name).iter_errors(body), key=str)
    assert not errors, f"{method} {path} {status} vs {name}: {[e.message for e in errors]}"
    if name == "Error":        # the code is one the spec lists for this status
        assert body["error"]["code"] in answer["description"], (path, status, body)


def check_request(path: str, body: dict[str, Any]) -> None:
    schema = SPEC["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    ref = schema["$ref"].rsplit("/", 1)[1]
    errors = list(validator(ref).iter_errors(body))
    assert not errors, [e.message for e in errors]


def test_spec_routes_equal_the_servers_routes() -> None:
    app = create_app(parse_config({}), "redis://127.0.0.1:1/0")
    # "*" routes answer the 404s and 405s of the error shape; they are not operations
    routes = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.resource is not None and r.method != "*"}
    documented = {(method.upper(), path) for path, ops in SPEC["paths"].items()
                  for method in ops}
    assert routes == documented


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_spec_schemas_are_valid_json_schema_and_every_ref_resolves() -> None:
    assert SPEC["openapi"].startswith("3.1")
    for schema in SPEC["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    refs = set(_refs(SPEC))
    assert refs, "the spec uses $ref"
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in SPEC["components"]["schemas"], ref
    for path, ops in SPEC["paths"].items():
        for method, op in ops.items():
            assert op["responses"], (method, path)
            for status, answer in op["responses"].items():
                assert answer["description"], (path, method, status)
            if path.startswith("/v1/admin/"):
                assert op["security"] == [{"adminToken": []}], (method, path)
                assert {"401", "403", "503"} <= set(op["responses"]), (method, path)
            elif path.startswith("/v1/"):
                assert op["security"] == [{"serviceToken": []}], (method, path)
                assert "401" in op["responses"] and "503" in op["responses"], (method, path)


def test_bearer_auth_is_declared_only_when_service_tokens_are_configured() -> None:
    open_spec = openapi_spec(parse_config({}))
    assert "serviceToken" not in open_spec["components"]["securitySchemes"]
    for path in ("/v1/reserve", "/v1/commit", "/v1/release"):
        assert open_spec["paths"][path]["post"]["security"] == []
    for path in ("/v1/commit", "/v1/release"):       # a reserve's api_key may still be a 401
        assert "401" not in open_spec["paths"][path]["post"]["responses"]
    assert SPEC["components"]["securitySchemes"]["serviceToken"]["scheme"] == "bearer"


@pytest.mark.parametrize(("schema", "fields"), [("ReserveRequest", RESERVE_FIELDS),
                                                ("CommitRequest", COMMIT_FIELDS),
                                                ("ReleaseRequest", RELEASE_FIELDS)])
def test_request_schemas_name_exactly_the_fields_the_server_accepts(
        schema: str, fields: frozenset[str]) -> None:
    declared = SPEC["components"]["schemas"][schema]
    assert set(declared["properties"]) == set(fields)
    assert declared["additionalProperties"] is False


async def test_openapi_json_is_served(serve: Serve) -> None:
    token = "tok-0123456789abcdef"
    client = await serve({"tiers": {"t": SMALL_TIER}, "server": {"service_tokens": [token]}})
    resp = await client.get("/openapi.json", headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert await resp.json() == SPEC


async def test_real_answers_validate_against_the_spec(serve: Serve, redis_client: Redis,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RATELIMITD_TEST_OPENAPI_TOKEN", "tok-openapi-0123456789")
    auth = {"Authorization": "Bearer tok-openapi-0123456789"}
    client = await serve({
        "server": {"service_tokens": ["env:RATELIMITD_TEST_OPENAPI_TOKEN"],
                   "max_body_bytes": 1024},
        "tiers": {"t": {**SMALL_TIER, "requests_per_minute": 3, "max_prompt_chars": 500,
                        "max_input_tokens": 5000}},
        "pricing": {"unknown_model": "deny"},
    })
    seen: set[tuple[str, int]] = set()

    async def check(path: str, body: Any = None, *, method: str = "POST",
                    headers: dict[str, str] | None = None) -> Any:
        resp, answer = await call(client, path, body, method=method,
                                  headers=auth if headers is None else headers)
        check_answer(method, path, resp.status, answer)
        seen.add((path, resp.status))
        return answer

    base = {"user": "u1", "tier": "t", "model": "gpt-4o"}
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "name": "bob", "content": [{"type": "text", "text": "Hi"}]}]
    for good in ({**base, "input_tokens": 10, "attributes": {"ip": "10.0.0.1"}},
                 {**base, "messages": messages, "max_output_tokens": 50,
                  "idempotency_key": "k1"}):
        check_request("/v1/reserve", good)
    first = await check("/v1/reserve", {**base, "input_tokens": 10,
                                         "attributes": {"ip": "10.0.0.1"}})
    second = await check("/v1/reserve", {**base, "messages": messages, "max_output_tokens": 50,
                                         "idempotency_key": "k1"})
    await check("/v1/reserve", {**base, "messages": messages, "max_output_tokens": 50,
                                "idempotency_key": "k1"})                     # duplicate
    await check("/v1/reserve", {**base, "input_tokens": 10, "dry_run": True})
    third = await check("/v1/reserve", {**base, "input_tokens": 10})
    denied = await check("/v1/reserve", {**base, "input_tokens": 10})
    assert denied["allowed"] is False
    never = await check("/v1/reserve", {**base, "user": "u2", "input_tokens": 3000})
    assert never["error"]["code"] == "exceeds_limit"
    for bad in ({**base}, {**base, "prompt": " "}, {**base, "prompt": "p" * 501},
                {**base, "input_tokens": 5001}, {**base, "input_tokens": 1, "model": "nope"},
                {**base, "input_tokens": 1, "api_key": "k"}):
        await check("/v1/reserve", bad)
    await check("/v1/reserve", {**base, "prompt": "x" * 2000})                 # 413
    await check("/v1/reserve", {**base, "input_tokens": 1}, headers={})        # 401
    await check("/v1/reserve", {**base, "input_tokens": 1},
                headers={"Authorization": "Bearer wrong"})

    commit = {"reservation_id": first["reservation_id"], "input_tokens": 10,
              "output_tokens": 5000}
    check_request("/v1/commit", commit)
    done = await check("/v1/commit", commit)
    assert "overrun" in done
    await check("/v1/commit", commit)                                          # duplicate
    await check("/v1/commit", {**commit, "reservation_id": UNKNOWN_RID})
    await check("/v1/commit", {**commit, "output_text": "x"})
    await check("/v1/commit", {"reservation_id": second["reservation_id"], "input_tokens": 1,
                               "cached_input_tokens": 1, "output_text": "Hello!",
                               "model": "gpt-4o"})
    check_request("/v1/release", {"reservation_id": third["reservation_id"]})
    await check("/v1/release", {"reservation_id": third["reservation_id"]})
    await check("/v1/release", {"reservation_id": third["reservation_id"]})     # duplicate
    await check("/v1/release", {"reservation_id": first["reservation_id"]})     # 409
    await check("/v1/commit", {**commit, "reservation_id": third["reservation_id"]})  # 409
    await check("/v1/release", {"reservation_id": "nope"})
    await check("/v1/release", {})
    await check("/healthz", method="GET", headers={})
    await check("/readyz", method="GET", headers={})

    assert seen >= {
        ("/v1/reserve", 200), ("/v1/reserve", 429), ("/v1/reserve", 400), ("/v1/reserve", 401),
        ("/v1/reserve", 413), ("/v1/commit", 200), ("/v1/commit", 404), ("/v1/commit", 400),
        ("/v1/commit", 409), ("/v1/release", 200), ("/v1/release", 409),
        ("/v1/release", 404), ("/v1/release", 400), ("/healthz", 200), ("/readyz", 200)}


async def test_unavailable_answers_validate_against_the_spec(serve: Serve) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    base = {"user": "u1", "tier": "free", "model": "gpt-4o", "input_tokens": 10}
    deny = await serve({"redis": {"timeout_ms": 50}}, url=dead)
    for path, body in (("/v1/reserve", base),
                       ("/v1/commit", {"reservation_id": UNKNOWN_RID,
                                       "input_tokens": 1, "output_tokens": 1}),
                       ("/v1/release", {"reservation_id": UNKNOWN_RID})):
        resp, answer = await call(deny, path, body)
        assert resp.status == 503
        check_answer("POST", path, 503, answer)
    resp, answer = await call(deny, "/readyz", method="GET")
    assert resp.status == 503
    check_answer("GET", "/readyz", 503, answer)
    allow = await serve({"redis": {"timeout_ms": 50, "on_error": "allow"}}, url=dead)
    resp, answer = await call(allow, "/v1/reserve", base)
    assert resp.status == 200 and answer["degraded"] is True
    check_answer("POST", "/v1/reserve", 200, answer)


async def test_routing_errors_use_the_error_schema(serve: Serve) -> None:
    client = await serve()
    for method, path, status in (("GET", "/nope", 404), ("GET", "/v1/reserve", 405)):
        resp, answer = await call(client, path, method=method)
        assert resp.status == status
        assert not list(validator("Error").iter_errors(answer)), answer


def test_a_wrong_answer_does_not_validate() -> None:
    """The validators are strict enough to catch a drifting server."""
    assert list(validator("ReserveAllowed").iter_errors({"allowed": True}))
    assert list(validator("Error").iter_errors({"error": {"code": "x", "message": "m"},
                                                "extra": 1}))
    assert list(validator("Error").iter_errors({"error": {"code": "Not Found",
                                                          "message": "m"}}))
    assert list(validator("CommitResponse").iter_errors(
        {"committed": True, "duplicate": False, "cost_usd": "1", "usage": {}, "alerts": []}))


def test_the_openapi_description_names_only_listed_codes_under_their_status() -> None:
    for path, item in SPEC["paths"].items():
        for operation in item.values():
            for status, answer in operation["responses"].items():
                description = answer["description"]
                if "codes: " not in description:
                    continue
                for code in description.partition("codes: ")[2].split(", "):
                    assert int(status) in ERROR_CODES.get(code, ()), (path, status, code)
