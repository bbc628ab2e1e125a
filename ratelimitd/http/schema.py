"""Request bodies of /v1/reserve, /v1/commit and /v1/release, checked field by field.

Everything a handler reads comes through here, so a bad body is refused with a 400 that names
the field before anything is counted or charged.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ratelimitd.abuse import InvalidIpError, canonical_ip
from ratelimitd.errors import ApiError, invalid

MAX_ID_CHARS: Final = 256
MAX_API_KEY_CHARS: Final = 1024        # longer is no key of ours: a 400, not a lookup
MAX_RESERVATION_ID_CHARS: Final = 1024
MAX_ATTRIBUTES: Final = 32
MAX_TOKENS: Final = 100_000_000          # per call; far above any model's context
MAX_MESSAGES: Final = 10_000
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
ATTRIBUTE_NAME: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")

RESERVE_FIELDS: Final = frozenset({
    "api_key", "user", "tier", "org", "model", "prompt", "messages", "input_tokens",
    "max_output_tokens", "min_output_tokens", "attributes", "idempotency_key", "dry_run",
    "signature", "tools",
})
COMMIT_FIELDS: Final = frozenset({
    "reservation_id", "input_tokens", "output_tokens", "output_text", "cached_input_tokens",
    "model",
})
RELEASE_FIELDS: Final = frozenset({"reservation_id"})


@dataclass(slots=True)
class ReserveBody:
    user: str
    tier: str
    model: str
    org: str | None = None
    prompt: str | None = None
    messages: Sequence[Mapping[str, Any]] | None = None
    tools: Sequence[Any] | None = None
    input_tokens: int | None = None
    max_output_tokens: int | None = None
    min_output_tokens: int | None = None
    attributes: Mapping[str, str] | None = None
    idempotency_key: str | None = None
    dry_run: bool = False
    api_key: str | None = None           # then user, tier and org come from the key
    signature: Any = None                # checked by signing.parse_signature (401s)


@dataclass(slots=True)
class CommitBody:
    reservation_id: str
    input_tokens: int
    cached_input_tokens: int = 0
    output_tokens: int | None = None
    output_text: str | None = None
    model: str | None = None


def _object(data: Any, allowed: frozenset[str]) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_request", "body: must be a JSON object")
    for key in data:
        if key not in allowed:
            raise invalid(key, f"unknown field (known: {', '.join(sorted(allowed))})")
    return data


def _text(data: Mapping[str, Any], key: str, *, required: bool = False,
          max_chars: int = MAX_ID_CHARS, path: str | None = None) -> str | None:
    """An identifier-like string: non-empty, bounded, no control characters. `path`: the
    field's full name in messages (default `key`)."""
    value = data.get(key)
    field = path or key
    if value is None:
        if required:
            raise invalid(field, "is required")
        return None
    if not isinstance(value, str) or not value:
        raise invalid(field, "must be a non-empty string")
    if len(value) > max_chars:
        raise invalid(field, f"must be at most {max_chars} characters")
    if _CONTROL.search(value):
        raise invalid(field, "must not contain control characters")
    return value


def _count(data: Mapping[str, Any], key: str, *, maximum: int = MAX_TOKENS,
           minimum: int = 0) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON has one number type: 5.0 is the whole number 5
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(key, "must be a whole number")
    if not minimum <= value <= maximum:
        raise invalid(key, f"must be between {minimum} and {maximum}")
    return value


def _attributes(data: Mapping[str, Any]) -> dict[str, str]:
    raw = data.get("attributes")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise invalid("attributes", "must be an object of strings")
    if len(raw) > MAX_ATTRIBUTES:
        raise invalid("attributes", f"at most {MAX_ATTRIBUTES} attributes")
    out: dict[str, str] = {}
    for name, value in raw.items():
        if not ATTRIBUTE_NAME.fullmatch(name):
            raise invalid(f"attributes.{name}", "names are lowercase letters, digits and '_'")
        if value is None:  # null is absent: "" would put every such caller in one bucket
            continue
        out[name] = _text(raw, name, path=f"attributes.{name}") or ""
    if "ip" in out:  # canonical (::ffff:a.b.c.d is a.b.c.d), as limits and blocks name it
        try:
            out["ip"] = canonical_ip(out["ip"])
        except InvalidIpError as exc:
            raise invalid("attributes.ip", str(exc).removeprefix("attributes.ip: ")) from exc
    return out


def _api_key(body: Mapping[str, Any]) -> str | None:
    """The key as sent (its format is checked by the key store: a malformed key is a 401, like
    an unknown one); it excludes user, tier and org, and a signature needs it."""
    api_key = body.get("api_key")
    if api_key is None:
        if body.get("signature") is not None:
            raise invalid("signature", "signed requests go with an api_key: send the key the "
                                       "client signed with")
        return None
    if not isinstance(api_key, str) or not api_key:
        raise invalid("api_key", "must be a non-empty string")
    if len(api_key) > MAX_API_KEY_CHARS:
        raise invalid("api_key", f"must be at most {MAX_API_KEY_CHARS} characters")
    named = [k for k in ("user", "tier", "org") if body.get(k) is not None]
    if named:
        raise invalid("api_key", f"send either api_key or {'/'.join(named)}, not both: the "
                                 "key names its user, org and tier")
    return api_key


def parse_reserve(data: Any) -> ReserveBody:
    body = _object(data, RESERVE_FIELDS)
    api_key = _api_key(body)
    sources = [k for k in ("prompt", "messages", "input_tokens") if body.get(k) is not None]
    if len(sources) != 1:
        raise invalid("prompt", "send exactly one of prompt, messages or input_tokens")
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise invalid("prompt", "must be a string")
    messages = body.get("messages")
    if messages is not None:
        if not isinstance(messages, list):
            raise invalid("messages", "must be an array of message objects")
        for message in messages:
            if not isinstance(message, dict):
                raise invalid("messages", "must be an array of message objects")
        if len(messages) > MAX_MESSAGES:
            raise invalid("messages", f"at most {MAX_MESSAGES} messages")
    tools = body.get("tools")
    if tools is not None:
        if messages is None:
            raise invalid("tools", "only with messages (tools are part of a chat request)")
        if not isinstance(tools, list) or not tools:
            raise invalid("tools", "must be a non-empty array of tool objects")
    dry_run = body.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise invalid("dry_run", "must be true or false")
    user = _text(body, "user", required=api_key is None) or ""
    tier = _text(body, "tier", required=api_key is None) or ""
    model = _text(body, "model", required=True) or ""
    org = _text(body, "org")
    input_tokens = _count(body, "input_tokens")
    # a call allowed no output at all is not a call: at least 1 (below min_output_tokens the
    # request's own cap is its floor: granted as asked, or denied)
    max_output_tokens = _count(body, "max_output_tokens", minimum=1)
    min_output_tokens = _count(body, "min_output_tokens", minimum=1)
    attributes = _attributes(body)
    idempotency_key = _text(body, "idempotency_key")
    # positional, in the fields' order: fifteen keywords cost a third of this function
    return ReserveBody(user, tier, model, org, prompt, messages, tools, input_tokens,
                       max_output_tokens, min_output_tokens, attributes, idempotency_key,
                       dry_run, api_key, body.get("signature"))


def parse_commit(data: Any) -> CommitBody:
    body = _object(data, COMMIT_FIELDS)
    input_tokens = _count(body, "input_tokens")
    if input_tokens is None:
        raise invalid("input_tokens", "is required")
    cached = _count(body, "cached_input_tokens") or 0
    if cached > input_tokens:
        raise invalid("cached_input_tokens", "counts part of input_tokens, so it cannot be more")
    output_tokens = _count(body, "output_tokens")
    output_text = body.get("output_text")
    if (output_tokens is None) == (output_text is None):
        raise invalid("output_tokens", "send exactly one of output_tokens or output_text")
    if output_text is not None and not isinstance(output_text, str):
        raise invalid("output_text", "must be a string")
    return CommitBody(parse_reservation_field(body), input_tokens, cached, output_tokens,
                      output_text, _text(body, "model"))


def parse_release(data: Any) -> str:
    return parse_reservation_field(_object(data, RELEASE_FIELDS))


def parse_reservation_field(body: Mapping[str, Any]) -> str:
    return _text(body, "reservation_id", required=True, max_chars=MAX_RESERVATION_ID_CHARS) or ""


def prompt_chars(body: ReserveBody) -> int:
    """Characters of text a reserve sends to the model, for max_prompt_chars."""
    if body.prompt is not None:
        return len(body.prompt)
    total = 0
    for message in body.messages or ():
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text", "")) for p in content
                         if isinstance(p, dict) and isinstance(p.get("text"), str))
    return total
