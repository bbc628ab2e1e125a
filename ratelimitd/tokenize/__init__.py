"""Token counting: tiktoken encodings loaded offline (offline.py), prompts counted as the
model's provider counts them (counter.py)."""

from ratelimitd.tokenize.counter import INLINE_COUNT_MAX_CHARS, TokenCounter
from ratelimitd.tokenize.offline import (
    DEFAULT_ENCODING,
    OFFLINE_ENCODINGS,
    check_encoding_name,
    load_encoding,
    tiktoken_cache_path,
)

__all__ = [
    "DEFAULT_ENCODING",
    "INLINE_COUNT_MAX_CHARS",
    "OFFLINE_ENCODINGS",
    "TokenCounter",
    "check_encoding_name",
    "load_encoding",
    "tiktoken_cache_path",
]
