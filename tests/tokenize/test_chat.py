"""Tools, tool calls and images are counted (tokenize/chat.py), as the provider counts them and
never below: the rendering of tool definitions, OpenAI's published image examples, and
estimates that only grow with what a request carries."""

from __future__ import annotations

import math
from typing import Any

import pytest
import tiktoken

from ratelimitd.errors import TokenCountError
from ratelimitd.tokenize import TokenCounter
from ratelimitd.tokenize.chat import MAX_SCHEMA_DEPTH, high_detail_tiles, render_tools

WEATHER: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["c", "f"]},
        "days": {"type": "array", "items": {"type": "integer"}},
        "where": {"type": "object", "properties": {"lat": {"type": "number"}}}}}}}


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter()


def o200k(text: str) -> int:
    return len(tiktoken.get_encoding("o200k_base").encode(text))


def test_tools_render_as_the_typescript_namespace_the_model_reads() -> None:
    rendered, unknown = render_tools([WEATHER])
    assert rendered == (
        "namespace functions {\n\n"
        "// Get the current weather.\n"
        "type get_weather = (_: {\n"
        "// City name\n"
        "city: string,\n"
        'unit?: "c" | "f",\n'
        "days?: number[],\n"
        "where?: {\n"
        "  lat?: number,\n"
        "},\n"
        "}) => any;\n\n"
        "} // namespace functions")
    assert unknown == []


def test_tools_cost_their_rendering_plus_framing(counter: TokenCounter) -> None:
    messages = [{"role": "user", "content": "weather in Paris?"}]
    without = counter.count_messages("gpt-4o", messages)
    rendered, _ = render_tools([WEATHER])
    assert counter.count_messages("gpt-4o", messages, [WEATHER]) == \
        without + o200k(rendered) + 9


def test_what_the_rendering_does_not_know_is_counted_in_full(counter: TokenCounter) -> None:
    messages = [{"role": "user", "content": "hi"}]
    plain = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string"}}}}}
    exotic = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"oneOf": [{"type": "string"},
                                                         {"type": "integer"}]}},
        "$defs": {"thing": {"type": "string", "description": "a long definition " * 10}}}}}
    assert counter.count_messages("gpt-4o", messages, [exotic]) > \
        counter.count_messages("gpt-4o", messages, [plain]) + 30


def test_tool_calls_and_function_calls_are_counted(counter: TokenCounter) -> None:
    base = [{"role": "user", "content": "weather?"}]
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    with_calls = [*base, {"role": "assistant", "content": None, "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]
    without = counter.count_messages("gpt-4o", base)
    tool_message = 3 + o200k("tool") + o200k("call_1") + o200k("18C")
    assistant = 3 + o200k("assistant") + 3 + o200k("get_weather") + \
        o200k('{"city": "Paris"}') + o200k("call_1")
    assert counter.count_messages("gpt-4o", with_calls) == without + assistant + tool_message
    legacy = [*base, {"role": "assistant", "content": None,
                      "function_call": {"name": "get_weather", "arguments": "{}"}}]
    assert counter.count_messages("gpt-4o", legacy) == \
        without + 3 + o200k("assistant") + 3 + o200k("get_weather") + o200k("{}")


@pytest.mark.parametrize(("width", "height", "tokens"), [
    (1024, 1024, 765),     # OpenAI's vision guide: "1024 x 1024 ... high ... 765 tokens"
    (2048, 4096, 1105),    # "2048 x 4096 ... high ... 1105 tokens"
    (4096, 8192, 1105),    # scaled into 2048 square first
    (100, 100, 255),
])
def test_images_cost_openais_high_detail_tiles(counter: TokenCounter, width: int, height: int,
                                               tokens: int) -> None:
    def image(**extra: Any) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "https://x/cat.png", **extra}}]}]
    text_only = counter.count_messages("gpt-4o", [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}]}])
    assert counter.count_messages("gpt-4o", image(width=width, height=height)) == \
        text_only + tokens
    assert counter.count_messages("gpt-4o", image(detail="low")) == text_only + 85
    # no size given: the most any image can cost (8 tiles), never less
    assert counter.count_messages("gpt-4o", image()) == text_only + 85 + 8 * 170
    assert counter.count_messages("gpt-4o-mini", image()) == text_only + 2833 + 8 * 5667
    configured = TokenCounter(image_tokens=1000)
    assert configured.count_messages("gpt-4o", image()) == text_only + 1000


def test_no_image_size_costs_more_than_eight_tiles() -> None:
    worst = max(high_detail_tiles(w, h) for w in range(64, 9000, 97)
                for h in range(64, 9000, 89))
    assert worst == 8
    assert high_detail_tiles(768, 2048) == 8 and math.ceil(768 / 512) == 2


@pytest.mark.parametrize(("messages", "tools", "path"), [
    ([{"role": "user", "content": [{"type": "image_url"}]}], None,
     "messages[0].content[0].image_url must be an object"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u",
                                                                       "width": 10}}]}],
     None, "messages[0].content[0].image_url.height"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}], None,
     "messages[0].tool_calls[0].function.arguments must be a string"),
    ([{"role": "user", "content": "x"}], [{"type": "function", "function": {}}],
     "tools[0].function.name"),
    ([{"role": "user", "content": "x"}], [{"type": "retrieval"}], "tools[0] must be"),
    # strings where objects or lists belong are named, not counted as text
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": "call"}], None,
     "messages[1].tool_calls must be a list of tool calls, not str"),
    ([{"role": "assistant", "function_call": "f"}], None,
     "messages[0].function_call must be an object"),
    ([{"role": "user", "content": {"text": "x"}}], None,
     "messages[0].content must be a string or a list of parts, not dict"),
    ([{"role": "user"}, {"role": 3}], None, "messages[1].role must be a string, not int"),
    ([{"role": "user", "content": "x"}, "hello"], None, "messages[1] must be an object, not str"),
    ([{"role": "user", "content": "x", "weight": 2}], None,
     "messages[0].weight is int: cannot count its tokens"),
])
def test_malformed_tools_and_parts_name_their_path(
        counter: TokenCounter, messages: Any, tools: Any, path: str) -> None:
    with pytest.raises(TokenCountError) as caught:
        counter.count_messages("gpt-4o", messages, tools)
    assert path in str(caught.value)


def test_parameters_nested_up_to_the_bound_are_rendered_and_deeper_ones_named() -> None:
    def nested(levels: int) -> Any:
        value: Any = {"type": "string"}           # one level
        for _ in range((levels - 1) // 2):
            value = {"type": "object", "properties": {"a": value}}    # two more
        return value

    deepest = nested(MAX_SCHEMA_DEPTH - 1)
    render_tools([{"type": "function", "function": {"name": "f", "parameters": deepest}}])
    wrapped = {"type": "object", "properties": {"a": {"anyOf": [deepest]}}}  # 3 levels more
    with pytest.raises(TokenCountError, match=r"tools\[0\]\.function\.parameters is nested"):
        render_tools([{"type": "function", "function": {"name": "f", "parameters": wrapped}}])
