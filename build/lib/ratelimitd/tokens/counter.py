"""Counting a prompt's tokens as the model's provider does.

Prompts are user input: text that looks like a special token ("<|endoftext|>") is counted as
ordinary text, so counting never raises on a string. Encoding a long text takes milliseconds
to seconds; `TokenCounter.count_prompt` moves that work off the event loop (tiktoken's Rust
core releases the GIL while it encodes).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Final

import tiktoken
import tiktoken.model

from ratelimitd.errors import EncodingUnavailableError, TokenCountError
from ratelimitd.tokens.offline import (
    DEFAULT_ENCODING,
    OFFLINE_ENCODINGS,
    SAME_ORDINARY_TOKENS,
    load_encoding,
)

# Below this many characters, encoding takes well under a millisecond: a thread hop would cost
# more than it saves.
INLINE_COUNT_MAX_CHARS: Final = 8192

# The cookbook formula for chat models (gpt-3.5-turbo-0613 and later, gpt-4*, gpt-4o*):
# https://cookbook.openai.com/examples/how_to_count_tokens_with_tiktoken
TOKENS_PER_MESSAGE: Final = 3
TOKENS_PER_NAME: Final = 1
REPLY_PRIMING_TOKENS: Final = 3

@dataclass(frozen=True, slots=True)
class _Texts:
    """What a prompt costs: strings to encode plus tokens that are fixed by the format."""

    strings: list[str]
    fixed_tokens: int = 0

    @property
    def chars(self) -> int:
        return sum(len(s) for s in self.strings)


def _count_strings(encoding: tiktoken.Encoding, strings: Sequence[str]) -> int:
    # encode_ordinary: special-token text in user input is ordinary text, and never raises.
    return sum(len(encoding.encode_ordinary(s)) for s in strings)


def _message_texts(messages: object) -> _Texts:
    """Validate chat messages and collect the strings the cookbook formula encodes."""
    if not isinstance(messages, list | tuple):
        raise TokenCountError(f"messages must be a list of objects, not {_kind(messages)}")
    strings: list[str] = []
    fixed = REPLY_PRIMING_TOKENS
    for i, message in enumerate(messages):
        fixed += TOKENS_PER_MESSAGE + _collect_message(message, f"messages[{i}]", strings)
    return _Texts(strings, fixed)


def _collect_message(message: object, path: str, strings: list[str]) -> int:
    """Append the message's strings to `strings`; return its fixed extra tokens."""
    if not isinstance(message, Mapping):
        raise TokenCountError(f"{path} must be an object, not {_kind(message)}")
    if not isinstance(message.get("role"), str):
        raise TokenCountError(f"{path}.role must be a string, not {_kind(message.get('role'))}")
    fixed = 0
    for key, value in message.items():
        field = f"{path}.{key}"
        if isinstance(value, str):
            strings.append(value)
            fixed += TOKENS_PER_NAME if key == "name" else 0
        elif key == "content":
            _collect_content(value, field, strings)
        else:
            raise TokenCountError(
                f"{field} is {_kind(value)}: cannot count its tokens; pass input_tokens instead"
            )
    return fixed


def _collect_content(content: object, path: str, strings: list[str]) -> None:
    if content is None:  # an assistant message that only carried tool calls
        return
    if not isinstance(content, list):
        raise TokenCountError(f"{path} must be a string or a list of parts, not {_kind(content)}")
    for j, part in enumerate(content):
        strings.append(_text_of_part(part, f"{path}[{j}]"))


def _text_of_part(part: object, path: str) -> str:
    if not isinstance(part, Mapping):
        raise TokenCountError(f"{path} must be an object, not {_kind(part)}")
    kind = part.get("type")
    if kind != "text":
        raise TokenCountError(
            f"{path} is a {kind!r} part: only text parts can be counted; pass input_tokens instead"
        )
    text = part.get("text")
    if not isinstance(text, str):
        raise TokenCountError(f"{path}.text must be a string, not {_kind(text)}")
    return text


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


class TokenCounter:
    """Counts prompt tokens per model, with operator overrides of the model -> encoding map."""

    def __init__(
        self,
        default_encoding: str = DEFAULT_ENCODING,
        models: Mapping[str, str] | None = None,
    ) -> None:
        self.default_encoding = default_encoding
        self._overrides = dict(models or {})
        # Longest first, so the most specific prefix wins.
        self._override_prefixes = sorted(self._overrides, key=len, reverse=True)
        # Load everything the config names now, so a bad config fails at startup, not per call.
        _load_for_config(default_encoding, "default_encoding")
        for model, encoding in self._overrides.items():
            _load_for_config(encoding, f"models[{model!r}]")
        self._loadable = OFFLINE_ENCODINGS | {default_encoding, *self._overrides.values()}
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

    def count_messages(self, model: str, messages: Sequence[Mapping[str, Any]]) -> int:
        texts = _message_texts(messages)
        return texts.fixed_tokens + _count_strings(self.encoding_for(model), texts.strings)

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
        texts = _prompt_texts(prompt, messages)
        encoding = self.encoding_for(model)
        if texts.chars < INLINE_COUNT_MAX_CHARS:
            return texts.fixed_tokens + _count_strings(encoding, texts.strings)
        loop = asyncio.get_running_loop()
        count = functools.partial(_count_strings, encoding, texts.strings)
        return texts.fixed_tokens + await loop.run_in_executor(executor, count)


def _prompt_texts(prompt: object, messages: object) -> _Texts:
    if (prompt is None) == (messages is None):
        raise TokenCountError("give exactly one of prompt and messages")
    if messages is not None:
        return _message_texts(messages)
    if not isinstance(prompt, str):
        raise TokenCountError(f"prompt must be a string, not {_kind(prompt)}")
    return _Texts([prompt])


def _load_for_config(encoding: str, setting: str) -> None:
    try:
        load_encoding(encoding)
    except EncodingUnavailableError as e:
        raise EncodingUnavailableError(f"{setting}: encoding {encoding!r}: {e}") from e
