"""Counting a prompt's tokens as the model's provider does.

Prompts are user input: text that looks like a special token ("<|endoftext|>") is counted as
ordinary text, so counting never raises on a string. Encoding a long text takes milliseconds
to seconds; `TokenCounter.count_prompt` moves that work off the event loop (tiktoken's Rust
core releases the GIL while it encodes). Callers take turns there (`CallerTurns`): one caller's
long prompts are encoded one at a time, so its flood holds one thread, never all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Final

import tiktoken
import tiktoken.model

from ratelimitd.errors import CountingQueueFull, EncodingUnavailableError, TokenCountError
from ratelimitd.tokenize.chat import (
    function_call_texts,
    image_tokens,
    tool_call_texts,
    tools_texts,
)
from ratelimitd.tokenize.offline import (
    DEFAULT_ENCODING,
    OFFLINE_ENCODINGS,
    SAME_ORDINARY_TOKENS,
    load_encoding,
)

# Below this many characters, encoding takes well under a millisecond: a thread hop would cost
# more than it saves.
INLINE_COUNT_MAX_CHARS: Final = 8192
# A caller's long prompts waiting for their turn, beyond the one being encoded; more are
# refused (each holds its body in memory meanwhile).
MAX_WAITING_PER_CALLER: Final = 32

# Counts of texts this long or longer are kept (a gateway resends the same system prompt and
# conversation on every call); a shorter one is encoded faster than it is looked up and kept,
CACHED_MIN_CHARS: Final = 256
# except the shortest (roles, names: the same few on every call), which a dict lookup answers
# in a tenth of an encode. At most SHORT_TEXTS_KEPT of them are kept (the set then starts over).
SHORT_MAX_CHARS: Final = 16
SHORT_TEXTS_KEPT: Final = 4096
# Model names whose encoding and count cache are kept (a lookup per call instead of tiktoken's
# model map); a caller sending ever new names only starts the set over.
MODELS_KEPT: Final = 1024
# The kept texts' characters, per encoding (the texts themselves are the keys): ~8 MB at most
CACHE_MAX_CHARS: Final = 2_000_000

# The cookbook formula for chat models (gpt-3.5-turbo-0613 and later, gpt-4*, gpt-4o*):
# https://cookbook.openai.com/examples/how_to_count_tokens_with_tiktoken
TOKENS_PER_MESSAGE: Final = 3
TOKENS_PER_NAME: Final = 1
REPLY_PRIMING_TOKENS: Final = 3

@dataclass(frozen=True, slots=True)
class PromptTexts:
    """What a prompt costs: strings to encode plus tokens that are fixed by the format (message
    framing, images, tool-call framing). `has_content`: the call sends the model something
    besides roles and whitespace."""

    strings: list[str]
    fixed_tokens: int = 0
    has_content: bool = True

    @property
    def chars(self) -> int:
        return sum(len(s) for s in self.strings)


@dataclass(slots=True)
class _Turn:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    holders: int = 0  # the caller's prompts encoding or waiting


class CallerTurns:
    """At most one long prompt per caller is encoded at a time; the others wait their caller's
    turn, at most `max_waiting` of them. With one caller flooding, the other threads stay free
    for everyone else."""

    __slots__ = ("_max_waiting", "_turns")

    def __init__(self, max_waiting: int = MAX_WAITING_PER_CALLER) -> None:
        self._max_waiting = max_waiting
        self._turns: dict[str, _Turn] = {}

    @contextlib.asynccontextmanager
    async def turn(self, caller: str) -> AsyncIterator[None]:
        turn = self._turns.get(caller)
        if turn is None:
            turn = self._turns[caller] = _Turn()
        elif turn.holders > self._max_waiting:
            raise CountingQueueFull(f"{turn.holders - 1} long prompts of this caller are "
                                    "already waiting to be counted")
        turn.holders += 1
        try:
            async with turn.lock:
                yield
        finally:
            turn.holders -= 1
            if not turn.holders:
                del self._turns[caller]


def _count_strings(encoding: tiktoken.Encoding, strings: Sequence[str]) -> int:
    # encode_ordinary: special-token text in user input is ordinary text, and never raises.
    return sum(len(encoding.encode_ordinary(s)) for s in strings)


class CountCache:
    """Token counts of long texts by content (a dict keyed by the text: its hash, then an
    equality check), least recently used out first once the texts kept reach `max_chars`;
    and of the shortest texts. Texts of other lengths are not kept. Used from the event
    loop's thread only."""

    def __init__(self, max_chars: int = CACHE_MAX_CHARS) -> None:
        self.max_chars = max_chars
        self._counts: dict[str, int] = {}
        self._chars = 0
        self._short: dict[str, int] = {}

    def get(self, text: str) -> int | None:
        size = len(text)
        if size <= SHORT_MAX_CHARS:
            return self._short.get(text)
        if size < CACHED_MIN_CHARS:
            return None
        count = self._counts.pop(text, None)
        if count is not None:
            self._counts[text] = count  # to the end: the most recently used
        return count

    def put(self, text: str, count: int) -> None:
        size = len(text)
        if size <= SHORT_MAX_CHARS:
            if len(self._short) >= SHORT_TEXTS_KEPT:
                self._short.clear()
            self._short[text] = count
            return
        if size < CACHED_MIN_CHARS or size > self.max_chars or text in self._counts:
            return
        self._counts[text] = count
        self._chars += len(text)
        while self._chars > self.max_chars:
            oldest = next(iter(self._counts))
            del self._counts[oldest]
            self._chars -= len(oldest)

    def __len__(self) -> int:
        return len(self._counts)


# A message is a JSON object: a dict, checked before the (slower) abstract Mapping
_OBJECT_TYPES: Final = (dict, Mapping)
_CALL_KEYS: Final = frozenset({"tool_calls", "function_call"})


@dataclass(slots=True)
class _Collector:
    """Walks chat messages, validating them, and gathers what they cost."""

    model: str
    image_tokens: int
    strings: list[str]
    fixed: int = 0
    content: bool = False

    def message(self, message: object, index: int) -> None:
        """messages[index]; field paths are spelled only for an error (this runs for every
        message of every call)."""
        if not isinstance(message, _OBJECT_TYPES):
            raise TokenCountError(f"messages[{index}] must be an object, not {_kind(message)}")
        role = message.get("role")
        if not isinstance(role, str):
            raise TokenCountError(f"messages[{index}].role must be a string, not {_kind(role)}")
        self.fixed += TOKENS_PER_MESSAGE
        for key, value in message.items():
            if isinstance(value, str) and key not in _CALL_KEYS:  # role, content, name
                self.strings.append(value)
                if key == "content":
                    self.content = self.content or bool(value.strip())
                elif key == "name":
                    self.fixed += TOKENS_PER_NAME
            elif key == "content":
                self.message_content(value, f"messages[{index}].content")
            elif value is None:  # null is absent
                continue
            elif key == "tool_calls":
                self.fixed += tool_call_texts(value, f"messages[{index}].{key}", self.strings)
                self.content = self.content or bool(value)
            elif key == "function_call":
                self.fixed += function_call_texts(value, f"messages[{index}].{key}",
                                                  self.strings)
                self.content = True
            else:
                raise TokenCountError(f"messages[{index}].{key} is {_kind(value)}: cannot "
                                      "count its tokens; pass input_tokens instead")

    def message_content(self, content: object, path: str) -> None:
        if content is None:  # an assistant message that only carried tool calls
            return
        if isinstance(content, str):
            self.strings.append(content)
            self.content = self.content or bool(content.strip())
            return
        if not isinstance(content, list):
            raise TokenCountError(
                f"{path} must be a string or a list of parts, not {_kind(content)}")
        for j, part in enumerate(content):
            self.part(part, f"{path}[{j}]")

    def part(self, part: object, path: str) -> None:
        if not isinstance(part, Mapping):
            raise TokenCountError(f"{path} must be an object, not {_kind(part)}")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise TokenCountError(f"{path}.text must be a string, not {_kind(text)}")
            self.strings.append(text)
            self.content = self.content or bool(text.strip())
        elif kind == "image_url":
            self.fixed += image_tokens(part, path, self.model, self.image_tokens)
            self.content = True
        else:
            raise TokenCountError(
                f"{path} is a {kind!r} part: only text and image_url parts can be counted; "
                "pass input_tokens instead")


def prompt_texts(model: str, prompt: object, messages: object, tools: object = None,
                 image_tokens_default: int = 0) -> PromptTexts:
    """Validates a prompt (or chat messages and tools) and gathers what it costs; raises
    TokenCountError naming the field at fault."""
    if (prompt is None) == (messages is None):
        raise TokenCountError("give exactly one of prompt and messages")
    if messages is None:
        if tools is not None:
            raise TokenCountError("tools: only with messages")
        if not isinstance(prompt, str):
            raise TokenCountError(f"prompt must be a string, not {_kind(prompt)}")
        return PromptTexts([prompt], 0, bool(prompt.strip()))
    if not isinstance(messages, list | tuple):
        raise TokenCountError(f"messages must be a list of objects, not {_kind(messages)}")
    collector = _Collector(model, image_tokens_default, [], REPLY_PRIMING_TOKENS)
    for i, message in enumerate(messages):
        collector.message(message, i)
    if tools is not None:
        strings, fixed = tools_texts(tools)  # type: ignore[arg-type]
        collector.strings.extend(strings)
        collector.fixed += fixed
    return PromptTexts(collector.strings, collector.fixed, collector.content)


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


class TokenCounter:
    """Counts prompt tokens per model, with operator overrides of the model -> encoding map."""

    def __init__(
        self,
        default_encoding: str = DEFAULT_ENCODING,
        models: Mapping[str, str] | None = None,
        image_tokens: int = 0,
    ) -> None:
        self.default_encoding = default_encoding
        self.image_tokens = image_tokens  # an image of unknown size; 0: the model's most
        self._overrides = dict(models or {})
        # Longest first, so the most specific prefix wins.
        self._override_prefixes = sorted(self._overrides, key=len, reverse=True)
        # Load everything the config names now, so a bad config fails at startup, not per call.
        _load_for_config(default_encoding, "default_encoding")
        for model, encoding in self._overrides.items():
            _load_for_config(encoding, f"models[{model!r}]")
        self._loadable = OFFLINE_ENCODINGS | {default_encoding, *self._overrides.values()}
        self._turns = CallerTurns()
        self._caches: dict[str, CountCache] = {}  # by encoding name
        self._by_model: dict[str, tuple[tiktoken.Encoding, CountCache]] = {}
        # Also load the bundled encodings tiktoken's model map may pick (~0.1-0.25 s and
        # 30-75 MB each): loading one lazily would stall the event loop on its first request.
        for encoding in OFFLINE_ENCODINGS:
            load_encoding(encoding)

    def encoding_name_for(self, model: str) -> str:
        if model in self._overrides:
            return self._overrides[model]
        for prefix in self._override_prefixes:
            if model.startswith(prefix + "-"):
                return self._overrides[prefix]
        try:
            known = tiktoken.model.encoding_name_for_model(model)
        except KeyError:
            return self.default_encoding
        known = SAME_ORDINARY_TOKENS.get(known, known)
        # Only encodings known to load: never try a download while serving a request.
        return known if known in self._loadable else self.default_encoding

    def encoding_for(self, model: str) -> tiktoken.Encoding:
        return load_encoding(self.encoding_name_for(model))

    def count_text(self, model: str, text: str) -> int:
        return _count_strings(self.encoding_for(model), [text])

    def count_messages(self, model: str, messages: Sequence[Mapping[str, Any]],
                       tools: Sequence[Any] | None = None) -> int:
        texts = self.prepare(model, None, messages, tools)
        return texts.fixed_tokens + _count_strings(self.encoding_for(model), texts.strings)

    def prepare(self, model: str, prompt: object, messages: object, tools: object = None
                ) -> PromptTexts:
        """Validates a prompt and gathers what it costs, without encoding anything."""
        return prompt_texts(model, prompt, messages, tools, self.image_tokens)

    async def count(self, model: str, texts: PromptTexts, executor: Executor | None = None,
                    caller: str | None = None) -> int:
        """Tokens of prepared texts; long ones are encoded in `executor`, in `caller`'s turn
        when one is named (CountingQueueFull when too many of its prompts wait). Counts of long
        texts seen before come from the cache."""
        encoding, cache = self._by_model.get(model) or self._encoding_and_cache(model)
        known, todo, todo_chars = texts.fixed_tokens, [], 0
        for text in texts.strings:
            count = cache.get(text)
            if count is None:
                todo.append(text)
                todo_chars += len(text)
            else:
                known += count
        if todo_chars < INLINE_COUNT_MAX_CHARS:
            encode = encoding.encode_ordinary
            counts = [len(encode(text)) for text in todo]
        else:
            counts = await self._count_off_loop(encoding, todo, executor, caller)
        for text, count in zip(todo, counts, strict=True):
            cache.put(text, count)
        return known + sum(counts)

    def _encoding_and_cache(self, model: str) -> tuple[tiktoken.Encoding, CountCache]:
        """The model's encoding and the cache of its counts, kept by model name (the names
        are the callers': at most MODELS_KEPT are kept, then the set starts over)."""
        name = self.encoding_name_for(model)
        cache = self._caches.get(name)
        if cache is None:
            cache = self._caches[name] = CountCache()
        if len(self._by_model) >= MODELS_KEPT:
            self._by_model.clear()
        self._by_model[model] = (load_encoding(name), cache)
        return self._by_model[model]

    async def _count_off_loop(self, encoding: tiktoken.Encoding, texts: list[str],
                              executor: Executor | None, caller: str | None) -> list[int]:
        loop = asyncio.get_running_loop()
        work = functools.partial(_each_count, encoding, texts)
        if caller is None:
            return await loop.run_in_executor(executor, work)
        async with self._turns.turn(caller):
            return await loop.run_in_executor(executor, work)

    async def count_prompt(
        self,
        model: str,
        prompt: str | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        executor: Executor | None = None,
    ) -> int:
        """Count a prompt or chat messages; long texts are encoded in `executor`.

        Validation runs inline, so malformed input raises TokenCountError before any thread hop.
        """
        return await self.count(model, self.prepare(model, prompt, messages), executor)


def _each_count(encoding: tiktoken.Encoding, strings: Sequence[str]) -> list[int]:
    return [len(encoding.encode_ordinary(s)) for s in strings]


def _load_for_config(encoding: str, setting: str) -> None:
    try:
        load_encoding(encoding)
    except EncodingUnavailableError as e:
        raise EncodingUnavailableError(f"{setting}: encoding {encoding!r}: {e}") from e
