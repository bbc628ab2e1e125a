"""What chat requests cost beyond their text: tool definitions, tool calls, and images.

Tools. OpenAI does not publish how it feeds function definitions to the model; the rendering
below is the one measured to match its billed prompt tokens: the functions become a TypeScript
namespace in the system message ("namespace functions { // desc\\ntype name = (_: { ... })
=> any; }"), plus 9 tokens of framing. It follows hmarr/openai-chat-tokens (src/functions.ts,
MIT), whose tests compare against the API's usage, and OpenAI's cookbook "How to count tokens
with tiktoken" (section "Counting tokens for chat completions with tool calls") for the
framing. We never subtract (the reference takes 4 tokens back when a system message exists),
and a schema construct the rendering does not know (oneOf, allOf, $ref, ...) is counted as its
whole JSON text: an estimate here may be high, never low.

Tool calls in assistant messages (`tool_calls`, and the older `function_call`) are counted as
their name, arguments and id text plus 3 tokens each (the reference's function_call framing).

Images follow OpenAI's published vision pricing rule ("Calculating costs" in the images and
vision guide): "low" detail costs the base tokens; otherwise the image is scaled to fit
2048x2048, then its shortest side to 768, and costs the base plus a per-tile amount for each
512-pixel tile. The request does not carry an image's size, so a gateway that knows it may
send `width` and `height` in the `image_url` object; without them an image costs the
configured default, else the most any image can (8 tiles: 1445 tokens on gpt-4o). Detail
"auto" or none is counted as "high".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from ratelimitd.errors import TokenCountError

# framing around the rendered namespace (hmarr/openai-chat-tokens functionsTokensEstimate)
TOOLS_FRAMING_TOKENS: Final = 9
TOKENS_PER_TOOL_CALL: Final = 3
MAX_TOOLS: Final = 1024
# Levels of arrays and objects in one tool's parameters: real schemas use a handful; the bound
# keeps the rendering's recursion and orjson's own limit (255) out of reach.
MAX_SCHEMA_DEPTH: Final = 64
MAX_IMAGE_SIDE: Final = 100_000  # pixels
_KNOWN_SCHEMA_KEYS: Final = frozenset({
    "type", "description", "properties", "required", "enum", "items", "anyOf",
    "additionalProperties", "title", "default", "minimum", "maximum", "minLength",
    "maxLength", "minItems", "maxItems", "format", "pattern", "examples", "strict",
})


@dataclass(frozen=True, slots=True)
class ImageRates:
    """Tokens an image costs on a model: `base` each, plus `tile` per 512-px tile."""

    base: int
    tile: int

    @property
    def most(self) -> int:
        """The most one image can cost: 768 x 2048 after scaling is 2 x 4 tiles."""
        return self.base + 8 * self.tile


# OpenAI's vision pricing table; models not listed (and not prefixed by one) use DEFAULT.
DEFAULT_IMAGE_RATES: Final = ImageRates(85, 170)
IMAGE_RATES: Final[Mapping[str, ImageRates]] = {
    "gpt-4o-mini": ImageRates(2833, 5667),
}


def image_rates(model: str) -> ImageRates:
    for prefix in sorted(IMAGE_RATES, key=len, reverse=True):
        if model == prefix or model.startswith(prefix + "-"):
            return IMAGE_RATES[prefix]
    return DEFAULT_IMAGE_RATES


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def image_tokens(part: Mapping[str, Any], path: str, model: str, default_tokens: int) -> int:
    """Tokens of an `image_url` content part (see the module's rule)."""
    image = part.get("image_url")
    if not isinstance(image, Mapping):
        raise TokenCountError(f"{path}.image_url must be an object with a url, "
                              f"not {_kind(image)}")
    if not isinstance(image.get("url"), str) or not image["url"]:
        raise TokenCountError(f"{path}.image_url.url must be a non-empty string")
    detail = image.get("detail", "auto")
    if detail not in ("low", "high", "auto"):
        raise TokenCountError(f"{path}.image_url.detail must be low, high or auto")
    rates = image_rates(model)
    if detail == "low":
        return rates.base
    width, height = image.get("width"), image.get("height")
    if width is None and height is None:
        return default_tokens if default_tokens > 0 else rates.most
    sizes = []
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if (isinstance(value, bool) or not isinstance(value, int)
                or not 1 <= value <= MAX_IMAGE_SIDE):
            raise TokenCountError(f"{path}.image_url.{name} must be a whole number of pixels "
                                  f"from 1 to {MAX_IMAGE_SIDE} (send both width and height, "
                                  "or neither)")
        sizes.append(value)
    return rates.base + rates.tile * high_detail_tiles(*sizes)


def high_detail_tiles(width: int, height: int) -> int:
    """512-px tiles of an image after OpenAI's scaling (fit 2048 square, shortest side 768)."""
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        scale = 2048 / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > 768:
        scale = 768 / min(w, h)
        w, h = w * scale, h * scale
    return math.ceil(w / 512) * math.ceil(h / 512)


def tool_call_texts(calls: object, path: str, strings: list[str]) -> int:
    """Appends a message's `tool_calls` texts to `strings`; returns their fixed tokens."""
    if not isinstance(calls, list):
        raise TokenCountError(f"{path} must be a list of tool calls, not {_kind(calls)}")
    for i, call in enumerate(calls):
        at = f"{path}[{i}]"
        if not isinstance(call, Mapping):
            raise TokenCountError(f"{at} must be an object, not {_kind(call)}")
        function = call.get("function")
        if not isinstance(function, Mapping):
            raise TokenCountError(f"{at}.function must be an object with name and arguments")
        function_call_texts(function, f"{at}.function", strings)
        for key in ("id", "type"):
            value = call.get(key)
            if value is not None and not isinstance(value, str):
                raise TokenCountError(f"{at}.{key} must be a string, not {_kind(value)}")
        if call.get("id") is not None:
            strings.append(call["id"])
    return TOKENS_PER_TOOL_CALL * len(calls)


def function_call_texts(call: object, path: str, strings: list[str]) -> int:
    """Appends a function call's name and arguments to `strings`; returns its fixed tokens."""
    if not isinstance(call, Mapping):
        raise TokenCountError(f"{path} must be an object with name and arguments")
    for key in ("name", "arguments"):
        value = call.get(key)
        if not isinstance(value, str):
            raise TokenCountError(f"{path}.{key} must be a string, not {_kind(value)}")
        strings.append(value)
    return TOKENS_PER_TOOL_CALL


def render_tools(tools: object) -> tuple[str, list[str]]:
    """The tools as the model sees them, and the JSON texts of schema parts the rendering
    does not know (counted in full). Raises TokenCountError naming the bad field."""
    if not isinstance(tools, list) or not tools:
        raise TokenCountError("tools must be a non-empty list of tool objects")
    if len(tools) > MAX_TOOLS:
        raise TokenCountError(f"tools: at most {MAX_TOOLS}")
    lines = ["namespace functions {", ""]
    unknown: list[str] = []
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise TokenCountError(f"{at} must be an object with type \"function\"")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise TokenCountError(f"{at}.function must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise TokenCountError(f"{at}.function.name must be a non-empty string")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise TokenCountError(f"{at}.function.description must be a string")
        parameters = function.get("parameters", {})
        if not isinstance(parameters, Mapping):
            raise TokenCountError(f"{at}.function.parameters must be a JSON Schema object")
        if _depth_exceeds(parameters, MAX_SCHEMA_DEPTH):
            raise TokenCountError(f"{at}.function.parameters is nested more than "
                                  f"{MAX_SCHEMA_DEPTH} levels deep")
        if description:
            lines.append(f"// {description}")
        properties = parameters.get("properties")
        if isinstance(properties, Mapping) and properties:
            lines.append(f"type {name} = (_: {{")
            lines.append(_properties(parameters, 0, unknown))
            lines.append("}) => any;")
        else:
            lines.append(f"type {name} = () => any;")
        lines.append("")
        _collect_unknown(parameters, unknown)
    lines.append("} // namespace functions")
    return "\n".join(lines), unknown


def _depth_exceeds(value: object, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` levels in `value` (without recursion)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = (item.values() if isinstance(item, Mapping)
                    else item if isinstance(item, list) else None)
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _properties(schema: Mapping[str, Any], indent: int, unknown: list[str]) -> str:
    required = schema.get("required")
    required = required if isinstance(required, list) else []
    lines = []
    properties = schema.get("properties")
    for name, prop in (properties.items() if isinstance(properties, Mapping) else ()):
        if not isinstance(prop, Mapping):
            unknown.append(orjson.dumps(prop).decode())
            continue
        description = prop.get("description")
        if isinstance(description, str) and description and indent < 2:
            lines.append(f"// {description}")
        elif isinstance(description, str) and description:
            unknown.append(description)  # deeper descriptions: counted, never dropped
        optional = "" if name in required else "?"
        lines.append(f"{name}{optional}: {_type(prop, indent, unknown)},")
    return "\n".join(" " * indent + line for line in lines)


def _type(schema: Mapping[str, Any], indent: int, unknown: list[str]) -> str:
    any_of = schema.get("anyOf")
    if isinstance(any_of, list):
        return " | ".join(_type(s, indent, unknown) if isinstance(s, Mapping) else "any"
                          for s in any_of)
    kind = schema.get("type")
    enum = schema.get("enum")
    if kind == "string" and isinstance(enum, list):
        return " | ".join(f'"{v}"' for v in enum)
    if kind in ("number", "integer") and isinstance(enum, list):
        return " | ".join(str(v) for v in enum)
    if kind in ("string", "boolean", "null"):
        return str(kind)
    if kind in ("number", "integer"):
        return "number"
    if kind == "object":
        return "\n".join(["{", _properties(schema, indent + 2, unknown), "}"])
    if kind == "array":
        items = schema.get("items")
        return f"{_type(items, indent, unknown)}[]" if isinstance(items, Mapping) else "any[]"
    unknown.append(orjson.dumps(schema).decode())  # no type we render: count its JSON
    return "any"


def _collect_unknown(schema: object, unknown: list[str]) -> None:
    """Schema keys the rendering ignores (oneOf, $ref, $defs...), anywhere: their JSON."""
    if isinstance(schema, Mapping):
        for key, value in schema.items():
            if key == "properties" and isinstance(value, Mapping):
                for prop in value.values():
                    _collect_unknown(prop, unknown)
            elif key not in _KNOWN_SCHEMA_KEYS:
                unknown.append(orjson.dumps({key: value}).decode())
            elif key in ("items", "additionalProperties"):
                _collect_unknown(value, unknown)
            elif key == "anyOf" and isinstance(value, list):
                for item in value:
                    _collect_unknown(item, unknown)


def tools_texts(tools: Sequence[Any]) -> tuple[list[str], int]:
    """The strings to encode for `tools` and their fixed framing tokens."""
    rendered, unknown = render_tools(tools)
    return [rendered, *unknown], TOOLS_FRAMING_TOKENS
