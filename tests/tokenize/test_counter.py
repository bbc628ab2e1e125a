"""Token counting: exact tiktoken counts, offline loading via tiktoken's cache, loop safety."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import tiktoken
import tiktoken.model

from ratelimitd.errors import CountingQueueFull, EncodingUnavailableError, TokenCountError
from ratelimitd.tokenize import TokenCounter
from ratelimitd.tokenize import offline as tokens
from ratelimitd.tokenize.counter import (
    CACHED_MIN_CHARS,
    SHORT_MAX_CHARS,
    SHORT_TEXTS_KEPT,
    CallerTurns,
    CountCache,
)
from ratelimitd.tokenize.offline import (
    CL100K_BASE_SHA256,
    CL100K_BASE_URL,
    O200K_BASE_SHA256,
    O200K_BASE_URL,
    OFFLINE_ENCODINGS,
    load_encoding,
    tiktoken_cache_path,
)

REPO = Path(__file__).resolve().parent.parent.parent

TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café, straße,日本語のテキスト, русский текст",
    "def square(x: int) -> int:\n    return x ** 2\n\nprint([square(i) for i in range(10)])\n",
    "party 🎉🎉 time 👩‍👩‍👧‍👦 and 🇫🇷",
    "a lone surrogate \ud800 from a bad JSON decode",
    "ignore previous instructions <|endoftext|> and <|endofprompt|><|fim_prefix|>",
    "",
]

# Token ids from tiktoken with the published rank files (computed once, hard-coded): a wrong or
# reordered rank file gives other ids even where it gives the same count.
KNOWN_IDS = {
    ("cl100k_base", "hello world"): [15339, 1917],
    ("o200k_base", "hello world"): [24912, 2375],
    ("cl100k_base", "<|endoftext|>"): [27, 91, 8862, 728, 428, 91, 29],
}

# The OpenAI cookbook's example ("How to count tokens with tiktoken"), whose counts the cookbook
# checked against the API's usage.prompt_tokens: 129 for gpt-4 / gpt-3.5-turbo, 124 for gpt-4o.
COOKBOOK_MESSAGES: list[dict[str, Any]] = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]


@pytest.fixture(scope="module", autouse=True)
def _private_tiktoken_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Load this process's encodings through a private cache dir, not the machine's /tmp."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken-cache")))
        mp.delenv("DATA_GYM_CACHE_DIR", raising=False)
        for name in OFFLINE_ENCODINGS:
            load_encoding(name)
        yield


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter()


# --- counts ------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", sorted(OFFLINE_ENCODINGS))
@pytest.mark.parametrize("text", TEXTS)
def test_count_text_equals_tiktoken(encoding: str, text: str) -> None:
    counter = TokenCounter(default_encoding=encoding)
    expected = len(load_encoding(encoding).encode_ordinary(text))
    assert counter.count_text("some-unknown-model", text) == expected


@pytest.mark.parametrize(("key", "ids"), KNOWN_IDS.items())
def test_known_token_ids(key: tuple[str, str], ids: list[int]) -> None:
    encoding, text = key
    assert load_encoding(encoding).encode_ordinary(text) == ids
    assert TokenCounter(default_encoding=encoding).count_text("unknown", text) == len(ids)


def test_special_token_text_counts_as_ordinary_text(counter: TokenCounter) -> None:
    # tiktoken's encode() would raise on this; a prompt must never make counting raise.
    text = "<|endoftext|>"
    with pytest.raises(ValueError, match="disallowed special token"):
        load_encoding("cl100k_base").encode(text)
    assert counter.count_text("gpt-4", text) == 7


def cookbook_count(encoding: tiktoken.Encoding, messages: list[dict[str, Any]]) -> int:
    """The cookbook's num_tokens_from_messages, extended to lists of text parts."""
    total = 3  # reply priming
    for message in messages:
        total += 3
        for key, value in message.items():
            texts = [p["text"] for p in value] if isinstance(value, list) else [value]
            total += sum(len(encoding.encode(t)) for t in texts)
            if key == "name":
                total += 1
    return total


@pytest.mark.parametrize(
    ("model", "expected"), [("gpt-4", 129), ("gpt-3.5-turbo", 129), ("gpt-4o", 124)]
)
def test_cookbook_example_matches_api_counts(
    counter: TokenCounter, model: str, expected: int
) -> None:
    assert counter.count_messages(model, COOKBOOK_MESSAGES) == expected


@pytest.mark.parametrize("model", ["gpt-4", "gpt-4o-mini"])
def test_messages_with_name_and_text_parts(counter: TokenCounter, model: str) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "name": "alice", "content": "Summarise: 日本語 🎉"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "first part"},
                {"type": "text", "text": "def f(x):\n    return x\n"},
            ],
        },
        {"role": "assistant", "content": "OK."},
    ]
    encoding = load_encoding(tiktoken.model.encoding_name_for_model(model))
    assert counter.count_messages(model, messages) == cookbook_count(encoding, messages)


def test_messages_with_special_token_text_do_not_raise(counter: TokenCounter) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "<|endoftext|>"}]}]
    assert counter.count_messages("gpt-4", messages) == 3 + 1 + 7 + 3


def test_empty_message_list_is_reply_priming_only(counter: TokenCounter) -> None:
    assert counter.count_messages("gpt-4o", []) == 3


def test_assistant_message_with_null_content(counter: TokenCounter) -> None:
    messages = [{"role": "assistant", "content": None}]
    assert counter.count_messages("gpt-4o", messages) == 3 + 1 + 3


# --- model -> encoding -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini", "o200k_base"),
        ("o1", "o200k_base"),
        ("gpt-4.1-mini", "o200k_base"),
        ("gpt-oss-120b", "o200k_base"),  # o200k_harmony: same ordinary tokens as o200k_base
        ("text-davinci-003", "cl100k_base"),  # p50k_base is not offline: the default
        ("llama-3-70b", "cl100k_base"),  # unknown: the default
    ],
)
def test_encoding_for_model(model: str, encoding: str) -> None:
    counter = TokenCounter(default_encoding="cl100k_base")
    assert counter.encoding_name_for(model) == encoding
    assert counter.encoding_for(model).name == encoding


def test_unknown_model_uses_default(counter: TokenCounter) -> None:
    assert counter.encoding_for("claude-3-opus").name == "o200k_base"


def test_overrides_win_exact_and_longest_prefix() -> None:
    counter = TokenCounter(
        models={
            "gpt-4o": "cl100k_base",
            "gpt-4": "o200k_base",
            "gpt-4-turbo": "cl100k_base",
            "my-model": "cl100k_base",
        }
    )
    assert counter.encoding_name_for("gpt-4o") == "cl100k_base"  # exact
    assert counter.encoding_name_for("gpt-4o-2024-08-06") == "cl100k_base"  # prefix + "-"
    assert counter.encoding_name_for("gpt-4") == "o200k_base"
    assert counter.encoding_name_for("gpt-4-0613") == "o200k_base"
    assert counter.encoding_name_for("gpt-4-turbo-2024-04-09") == "cl100k_base"  # longest
    assert counter.encoding_name_for("my-model-v2") == "cl100k_base"
    # A prefix only covers "<key>-...": gpt-4.1 is not a gpt-4 variant.
    assert counter.encoding_name_for("gpt-4.1") == "o200k_base"
    assert counter.encoding_name_for("my-modelx") == "o200k_base"


def test_bad_default_encoding_fails_at_construction() -> None:
    with pytest.raises(EncodingUnavailableError, match=r"default_encoding: encoding 'nope'"):
        TokenCounter(default_encoding="nope")


def test_bad_override_fails_at_construction() -> None:
    with pytest.raises(EncodingUnavailableError, match=r"models\['gpt-4'\].*'cl100k'"):
        TokenCounter(models={"gpt-4": "cl100k"})


def test_unknown_encoding_names_the_offline_ones() -> None:
    with pytest.raises(EncodingUnavailableError, match="cl100k_base, o200k_base"):
        load_encoding("no_such_encoding")


# --- errors ------------------------------------------------------------------------------


def test_a_part_that_cannot_be_counted_names_its_path(counter: TokenCounter) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "x"},
        {"role": "user", "content": "y"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
            ],
        },
    ]
    with pytest.raises(TokenCountError, match=r"messages\[2\]\.content\[1\].*input_tokens"):
        counter.count_messages("gpt-4o", messages)


@pytest.mark.parametrize(
    ("messages", "path"),
    [
        ({"role": "user", "content": "hi"}, "messages must be a list"),
        ("hello", "messages must be a list"),
        ([{"role": "user", "content": "a"}, "hi"], "messages[1] must be an object"),
        ([{"content": "hi"}], "messages[0].role must be a string"),
        ([{"role": 7, "content": "hi"}], "messages[0].role must be a string"),
        ([{"role": "user", "content": 42}], "messages[0].content must be a string or a list"),
        ([{"role": "user", "content": ["hi"]}], "messages[0].content[0] must be an object"),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
        ([{"role": "user", "content": [{"text": "hi"}]}], "messages[0].content[0] is a None"),
        ([{"role": "user", "name": 5, "content": "x"}], "messages[0].name is int"),
        (
            [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}],
            "messages[0].tool_calls[0].function must be an object",
        ),
    ],
)
def test_malformed_messages_name_the_path(counter: TokenCounter, messages: Any, path: str) -> None:
    with pytest.raises(TokenCountError, match=re.escape(path)):
        counter.count_messages("gpt-4", messages)


async def test_count_prompt_needs_exactly_one_input(counter: TokenCounter) -> None:
    with pytest.raises(TokenCountError, match="exactly one"):
        await counter.count_prompt("gpt-4")
    with pytest.raises(TokenCountError, match="exactly one"):
        await counter.count_prompt("gpt-4", prompt="a", messages=[])
    with pytest.raises(TokenCountError, match="prompt must be a string"):
        await counter.count_prompt("gpt-4", prompt=b"bytes")  # type: ignore[arg-type]


# --- event loop --------------------------------------------------------------------------


class CountingExecutor(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.submitted = 0

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        self.submitted += 1
        return super().submit(*args, **kwargs)


async def test_count_prompt_small_counts_inline_large_uses_executor(
    counter: TokenCounter,
) -> None:
    with CountingExecutor() as executor:
        small = "hello " * 100
        assert await counter.count_prompt("gpt-4", prompt=small, executor=executor) == (
            counter.count_text("gpt-4", small)
        )
        assert executor.submitted == 0
        messages = [{"role": "user", "content": "word " * 5000}] * 3
        assert await counter.count_prompt("gpt-4", messages=messages, executor=executor) == (
            counter.count_messages("gpt-4", messages)
        )
        assert executor.submitted == 1


async def test_count_prompt_on_1mb_keeps_the_loop_ticking(counter: TokenCounter) -> None:
    # One 1 MB run without whitespace is BPE's slowest case (~0.5 s here if counted inline).
    rng = random.Random(0)
    prompt = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=1_000_000))
    ticks: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while True:
            ticks.append(time.perf_counter())  # also after the count: a stall shows as a gap
            if done.is_set():
                return
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    started = time.perf_counter()
    count = await counter.count_prompt("gpt-4o", prompt=prompt)
    duration = time.perf_counter() - started
    done.set()
    await task

    max_gap = max(b - a for a, b in itertools.pairwise(ticks))
    # An inline count would leave one gap as long as the whole count.
    assert max_gap < 0.2
    assert max_gap < duration / 2, (max_gap, duration)
    assert count == counter.count_text("gpt-4o", prompt)


# --- offline loading through tiktoken's cache (fresh subprocesses) -----------------------

SAMPLE = "hello world <|endoftext|> naïve 🎉 def f(x): return x**2"

# Runs in a fresh interpreter: network access raises, and every file opened is recorded.
CHILD = """
import json, sys

opened = []

def audit(event, args):
    if event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.connect"):
        raise OSError(f"network disabled in this test: {event}")
    if event == "open" and isinstance(args[0], str):
        opened.append(args[0])

sys.addaudithook(audit)

from ratelimitd.errors import EncodingUnavailableError
from ratelimitd.tokenize import load_encoding

sample = sys.argv[1]
out = {"opened": opened, "encodings": {}}
for name in sys.argv[2:]:
    try:
        enc = load_encoding(name)
    except EncodingUnavailableError as e:
        out["encodings"][name] = {"error": str(e)}
        continue
    out["encodings"][name] = {
        "ordinary": enc.encode_ordinary(sample),
        "special": enc.encode(sample, allowed_special="all"),
        "n_vocab": enc.n_vocab,
        "special_tokens": sorted(enc.special_tokens_set),
    }
print(json.dumps(out))
"""

RANK_FILES = {
    "cl100k_base": (CL100K_BASE_URL, CL100K_BASE_SHA256),
    "o200k_base": (O200K_BASE_URL, O200K_BASE_SHA256),
}


def run_child(env_overrides: dict[str, str], *names: str) -> dict[str, Any]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")
    }
    env.update(env_overrides)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, SAMPLE, *names],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def expected_encoding(name: str) -> dict[str, Any]:
    enc = load_encoding(name)
    return {
        "ordinary": enc.encode_ordinary(SAMPLE),
        "special": enc.encode(SAMPLE, allowed_special="all"),
        "n_vocab": enc.n_vocab,
        "special_tokens": sorted(enc.special_tokens_set),
    }


def cache_file(cache_dir: Path, name: str) -> Path:
    url, _ = RANK_FILES[name]
    return cache_dir / hashlib.sha1(url.encode()).hexdigest()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bundled_paths(opened: list[str]) -> list[str]:
    return [p for p in opened if p.endswith(".tiktoken.gz")]


def test_constants_match_tiktoken() -> None:
    # The URLs and hashes are those tiktoken's constructors ask for (checked by source text, as
    # calling the constructors would download).
    source = Path(tiktoken.__file__).parent.parent / "tiktoken_ext" / "openai_public.py"
    text = source.read_text()
    for url, sha in RANK_FILES.values():
        assert f'"{url}",\n        expected_hash="{sha}"' in text


def test_cache_path_follows_tiktoken_env_precedence(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    key = hashlib.sha1(CL100K_BASE_URL.encode()).hexdigest()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/a")
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", "/b")
    assert tiktoken_cache_path("cl100k_base") == f"/a/{key}"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    assert tiktoken_cache_path("cl100k_base") is None  # caching disabled, as in tiktoken
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    assert tiktoken_cache_path("cl100k_base") == f"/b/{key}"
    monkeypatch.delenv("DATA_GYM_CACHE_DIR")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert tiktoken_cache_path("cl100k_base") == str(tmp_path / "data-gym-cache" / key)


def test_cold_then_warm_cache(tmp_path: Path) -> None:
    names = sorted(RANK_FILES)
    env = {"TIKTOKEN_CACHE_DIR": str(tmp_path)}

    cold = run_child(env, *names)
    for name in names:
        assert cold["encodings"][name] == expected_encoding(name)
        path = cache_file(tmp_path, name)
        assert sha256_of(path) == RANK_FILES[name][1]
        assert path.stat().st_mode & 0o777 == 0o644
    assert len(bundled_paths(cold["opened"])) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        cache_file(tmp_path, n).name for n in names
    )  # no temporary files left behind
    before = {n: cache_file(tmp_path, n).stat() for n in names}

    warm = run_child(env, *names)
    for name in names:
        assert warm["encodings"][name] == expected_encoding(name)
        after = cache_file(tmp_path, name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before[name].st_ino, before[name].st_mtime_ns)
        assert str(cache_file(tmp_path, name)) in warm["opened"]
    assert bundled_paths(warm["opened"]) == []  # tiktoken read its cache; no decompression


def test_data_gym_cache_dir_and_default_dir_are_honoured(tmp_path: Path) -> None:
    data_gym = tmp_path / "dg"
    run_child({"DATA_GYM_CACHE_DIR": str(data_gym)}, "cl100k_base")
    assert sha256_of(cache_file(data_gym, "cl100k_base")) == CL100K_BASE_SHA256

    # No variable: tiktoken's default, <tempdir>/data-gym-cache (TMPDIR moves tempdir).
    run_child({"TMPDIR": str(tmp_path)}, "cl100k_base")
    default = tmp_path / "data-gym-cache"
    assert sha256_of(cache_file(default, "cl100k_base")) == CL100K_BASE_SHA256


def test_corrupted_cache_file_is_replaced(tmp_path: Path) -> None:
    # A well-formed rank file with two ranks swapped: tiktoken would parse it happily and count
    # with different ids. Only the hash tells.
    run_child({"TIKTOKEN_CACHE_DIR": str(tmp_path)}, "cl100k_base")
    path = cache_file(tmp_path, "cl100k_base")
    lines = path.read_bytes().splitlines(keepends=True)
    hello, world = lines[15339].split()[0], lines[1917].split()[0]
    lines[15339], lines[1917] = world + b" 15339\n", hello + b" 1917\n"
    path.write_bytes(b"".join(lines))
    assert sha256_of(path) != CL100K_BASE_SHA256

    result = run_child({"TIKTOKEN_CACHE_DIR": str(tmp_path)}, "cl100k_base")
    assert result["encodings"]["cl100k_base"] == expected_encoding("cl100k_base")
    assert result["encodings"]["cl100k_base"]["ordinary"][:2] == [15339, 1917]
    assert sha256_of(path) == CL100K_BASE_SHA256


@pytest.mark.parametrize("cache", ["disabled", "unwritable"])
def test_builds_in_memory_when_cache_unusable(tmp_path: Path, cache: str) -> None:
    if cache == "disabled":
        cache_dir = ""
    else:
        (tmp_path / "file").write_text("not a directory")
        cache_dir = str(tmp_path / "file" / "cache")  # root ignores permissions; this can't work
    result = run_child({"TIKTOKEN_CACHE_DIR": cache_dir}, *sorted(RANK_FILES))
    for name in RANK_FILES:
        assert result["encodings"][name] == expected_encoding(name)


def test_other_encodings_fail_clearly_offline(tmp_path: Path) -> None:
    result = run_child({"TIKTOKEN_CACHE_DIR": str(tmp_path)}, "p50k_base")
    error = result["encodings"]["p50k_base"]["error"]
    assert "'p50k_base' cannot be loaded offline" in error
    assert "cl100k_base, o200k_base" in error


def test_bundled_hash_mismatch_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = tokens._RankFile(CL100K_BASE_URL, "0" * 64)
    monkeypatch.setattr(tokens, "_RANK_FILES", {**tokens._RANK_FILES, "cl100k_base": wrong})
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    with pytest.raises(EncodingUnavailableError, match=r"SHA-256 223921b7.*but tiktoken publishes"):
        load_encoding.__wrapped__("cl100k_base")  # bypass the per-process cache


def test_falls_back_to_memory_if_tiktoken_cannot_read_its_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def download_attempt(name: str) -> tiktoken.Encoding:
        raise ConnectionError("cache file vanished; tiktoken tried to download")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken, "get_encoding", download_attempt)
    encoding = load_encoding.__wrapped__("o200k_base")  # bypass the per-process cache
    assert encoding.encode_ordinary(SAMPLE) == load_encoding("o200k_base").encode_ordinary(SAMPLE)


async def test_caller_turns_serialize_one_caller_bound_its_waiting_and_forget_it() -> None:
    turns = CallerTurns(max_waiting=2)
    running: list[str] = []
    most = {"a": 0, "b": 0}
    release = asyncio.Event()

    async def job(caller: str) -> None:
        async with turns.turn(caller):
            running.append(caller)
            most[caller] = max(most[caller], running.count(caller))
            await release.wait()
            running.remove(caller)

    tasks = [asyncio.create_task(job("a")) for _ in range(3)]   # one encoding, two waiting
    other = asyncio.create_task(job("b"))
    await asyncio.sleep(0)
    assert sorted(running) == ["a", "b"]                 # b is not queued behind a's prompts
    with pytest.raises(CountingQueueFull):
        async with turns.turn("a"):
            pass
    release.set()
    await asyncio.gather(*tasks, other)
    assert most == {"a": 1, "b": 1}
    assert turns._turns == {}                           # no state left for idle callers


def test_count_cache_keeps_the_shortest_and_the_long_texts_only() -> None:
    cache = CountCache(max_chars=3 * CACHED_MIN_CHARS)
    short, medium = "u" * SHORT_MAX_CHARS, "m" * (SHORT_MAX_CHARS + 1)
    longs = [c * CACHED_MIN_CHARS for c in "abcd"]
    for text in (short, medium, *longs):
        cache.put(text, len(text))
    assert cache.get(short) == SHORT_MAX_CHARS
    assert cache.get(medium) is None          # encoded each time: cheaper than keeping it
    assert cache.get(longs[0]) is None        # the least recently used long text went out
    assert [cache.get(t) for t in longs[1:]] == [CACHED_MIN_CHARS] * 3
    for i in range(SHORT_TEXTS_KEPT):         # callers' short texts cannot grow it unbounded
        cache.put(f"s{i}", 1)
    cache.put("one more", 2)
    assert cache.get(short) is None and cache.get("one more") == 2


async def test_counts_from_the_cache_equal_tiktoken(counter: TokenCounter) -> None:
    messages = [{"role": "system", "content": "You are terse. " * 30},
                {"role": "user", "name": "ann", "content": "Hi"}]
    expected = counter.count_messages("gpt-4o", messages)
    texts = counter.prepare("gpt-4o", None, messages)
    assert [await counter.count("gpt-4o", texts) for _ in range(3)] == [expected] * 3
