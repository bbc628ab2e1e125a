"""Logs: JSON lines on stderr, a request id in every line about a request, no secret ever.

- `setup_logging()` puts one handler on the root logger, a `JsonLinesHandler`: `JsonFormatter`
  (one object per line: ts, level, logger, msg, request_id when known, the record's extra
  fields, exc) behind a `RedactingFilter`. journald keeps stderr as it is, one entry per line.
- `request_scope(header)` binds a request id for the duration of one request: the caller's
  `X-Request-Id` when it is a sane token, else a new one. Return it in the answer's header.
- `access_log_options()` gives aiohttp's access log as JSON lines: a line per answer, written
  straight to the handler's stream (no `logging` record per request; the lines of up to
  ACCESS_LINES_KEPT_S in one write), or no access log at all.
- `ThrottledLog` keeps noisy lines (every line a client can trigger: hang-ups, garbage
  request lines, unhandled errors with their tracebacks, a Redis outage seen by each request)
  to N a window per kind, then says how many it left out.

Redaction is the safety net, not the policy: code should not log secrets in the first place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import sys
import time
import typing
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import IO, Any, Final

import orjson
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

REQUEST_ID_HEADER: Final = "X-Request-Id"
# A caller's id is kept when it is a plain token of reasonable length; anything else (spaces,
# quotes, control characters, 200 bytes of junk) could forge or bloat log lines: a new one then.
_SANE_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# Context-local (one value per asyncio task), not process state.
request_id_var: ContextVar[str | None] = ContextVar("ratelimitd_request_id", default=None)

# Access lines are kept and written together, at most this long after the first of them: one
# write for a few hundred lines at full load instead of one a request or a loop turn. A record
# logged meanwhile writes them first (lines stay in order), and so do flush() and the end of a
# serving process.
ACCESS_LINES_KEPT_S: Final = 0.02
# ... or as soon as this many bytes wait
ACCESS_BYTES_KEPT: Final = 64 * 1024
# A flush this late is not coming (its event loop was closed first): the next line writes.
_FLUSH_LOST_S: Final = 1.0

REDACTED: Final = "[redacted]"
_BEARER: Final = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
_API_KEY: Final = re.compile(r"\brlk_[A-Za-z0-9_-]+")  # our API keys and signing secrets
# every pattern below needs one of these words (in lower case) to match
_HINT: Final = re.compile("bearer|basic|rlk_|api_key|signing_secret|signature|secret|token|"
                          "password|pepper|authorization")
# "name": "value" or name=value for fields that hold secrets
_SECRET_FIELD: Final = re.compile(
    r"""(?i)(["']?\b(?:api_key|signing_secret|signature|secret|token|service_tokens?|"""
    r"""admin_tokens?|password|pepper|authorization)["']?\s*[:=]\s*)(["']?)[^"',}\s]+""")
_LONG_HEX: Final = re.compile(r"\b[0-9a-fA-F]{64,}\b")  # an HMAC-SHA256 quoted out of context
_SECRET_FIELDS: Final = frozenset({"api_key", "authorization", "signature", "signing_secret",
                                   "token", "service_token", "admin_token", "password",
                                   "pepper", "secret"})
# LogRecord's own attributes: everything else on a record came in through `extra=`
_RECORD_FIELDS: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}


def redact(text: str) -> str:
    """Whatever looks like a secret, replaced. One search for a hint first: most lines hold
    none, and a line must cost microseconds (the access log writes one per request)."""
    if len(text) < 64 and _HINT.search(text.lower()) is None:
        return text
    text = _BEARER.sub(r"\1 " + REDACTED, text)
    text = _API_KEY.sub("rlk_" + REDACTED, text)
    text = _SECRET_FIELD.sub(r"\1\2" + REDACTED, text)
    return _LONG_HEX.sub(REDACTED, text)


def _redact_value(name: str, value: Any) -> Any:
    if name.lower() in _SECRET_FIELDS:
        return REDACTED
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(name, v) for v in value]
    return value


class RedactingFilter(logging.Filter):
    """On the handler: the message (formatted with its arguments), every extra field and the
    traceback lose whatever looks like a secret before any formatter sees them."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        fields = vars(record)
        for name, value in fields.items():
            if name not in _RECORD_FIELDS and not isinstance(value, int | float):
                fields[name] = _redact_value(name, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ms), level, logger, msg, request_id, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id is not None:
            line["request_id"] = request_id
        for name, value in vars(record).items():
            if name not in _RECORD_FIELDS:
                line.setdefault(name, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        return orjson.dumps(line, default=str).decode()


class JsonLinesHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root handler. Beside the records of `logging`, it takes finished lines
    (`write_line`, the access log's), kept for up to ACCESS_LINES_KEPT_S (or
    ACCESS_BYTES_KEPT) and then written together. A record logged meanwhile writes the kept
    lines first, so lines stay in order."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self._kept: list[bytes] = []
        self._kept_bytes = 0
        self._flush_by = 0.0  # when the kept lines' flush is due (time.monotonic)

    def write_line(self, line: bytes) -> None:
        """A finished JSON object, without its newline."""
        kept = self._kept
        if not kept:
            try:
                asyncio.get_running_loop().call_later(ACCESS_LINES_KEPT_S, self.flush)
            except RuntimeError:  # no loop: write now
                kept.append(line)
                self.flush()
                return
            self._flush_by = time.monotonic() + ACCESS_LINES_KEPT_S
        kept.append(line)
        self._kept_bytes += len(line)
        if (self._kept_bytes >= ACCESS_BYTES_KEPT
                or time.monotonic() > self._flush_by + _FLUSH_LOST_S):
            self.flush()

    def emit(self, record: logging.LogRecord) -> None:
        if self._kept:
            self.flush()
        super().emit(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._kept:
                data = b"\n".join(self._kept) + b"\n"
                self._kept.clear()
                self._kept_bytes = 0
                raw = getattr(self.stream, "buffer", None)
                if raw is not None:  # stderr: past its text layer, no decode and encode
                    self.stream.flush()
                    raw.write(data)
                    raw.flush()
                else:
                    self.stream.write(data.decode())
            super().flush()


def setup_logging(level: int | str = logging.INFO, stream: IO[str] | None = None
                  ) -> logging.Handler:
    """JSON lines on stderr (or `stream`) for every logger; replaces earlier handlers of the
    root logger so no line is written twice or in another format."""
    handler = JsonLinesHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


# -- request ids --------------------------------------------------------------------------------

def new_request_id() -> str:
    """16 hex digits: 64 random bits (random.getrandbits, not the OS: a request id names a
    line in the logs, it guards nothing)."""
    return f"{random.getrandbits(64):016x}"


def request_id_from(header: str | None) -> str:
    """The caller's X-Request-Id when sane (and not one of our keys pasted by mistake), else
    a new one."""
    if (header is not None and _SANE_REQUEST_ID.fullmatch(header)
            and not header.startswith("rlk_")):
        return header
    return new_request_id()


@contextlib.contextmanager
def request_scope(header: str | None) -> Iterator[str]:
    """Binds the request id for every line logged inside; yields it for the answer's header.

    Reset on exit: aiohttp serves a keep-alive connection's requests in one task, so the next
    request on it must not inherit this id."""
    request_id = request_id_from(header)
    token = request_id_var.set(request_id)
    try:
        yield request_id
    finally:
        request_id_var.reset(token)


# -- access log ---------------------------------------------------------------------------------

class AccessLog(AbstractAccessLogger):
    """An access log: aiohttp calls `log` for the answers it writes, the HTTP lane calls
    `entry` for its own (http/lane.py), with what the line holds."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.entry(request.method, request.path, response.status,
                   response.headers.get(REQUEST_ID_HEADER), time, response.body_length,
                   request.remote)

    def entry(self, method: str, path: str, status: int, request_id: str | None,
              seconds: float, sent_bytes: int, remote: str | None) -> None:
        raise NotImplementedError


class JsonAccessLogger(AccessLog):
    """aiohttp's access log through `logging` (when the root logger has no JsonLinesHandler,
    as in a program that embeds the app): one JSON line per answer, with the request id of
    the answer's X-Request-Id header. The path is logged without its query string (admin calls
    carry ids there); the Authorization header is never read."""

    def entry(self, method: str, path: str, status: int, request_id: str | None,
              seconds: float, sent_bytes: int, remote: str | None) -> None:
        token = request_id_var.set(request_id) if request_id else None
        try:
            self.logger.info("%s %s %d", method, path, status,
                             extra={"method": method, "path": path, "status": status,
                                    "duration_ms": round(seconds * 1000, 3),
                                    "bytes": sent_bytes, "remote": remote})
        finally:
            if token is not None:
                request_id_var.reset(token)


# ".000Z" to ".999Z": a line's milliseconds, looked up rather than formatted
_MILLIS: Final = tuple(b".%03dZ" % ms for ms in range(1000))


class _Timestamps:
    """The `ts` of a line now: the formatted second is kept while it lasts."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = b""

    def now(self) -> bytes:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()
        return self._text + _MILLIS[int((now - second) * 1000)]


# (method, path, status) kinds of access-log line whose redacted parts are kept; a scan of
# random paths only starts the set over
ACCESS_PARTS_KEPT: Final = 256


class DirectAccessLogger(AccessLog):
    """The access log written straight to the root JsonLinesHandler: the same line as a
    record through `logging` would give (ts, level, logger, msg, request_id, method, path,
    status, duration_ms, bytes, remote), redacted alike, without a LogRecord per request.
    aiohttp makes one per connection; the handler and clock are the class's (see
    `access_log_options`)."""

    handler: JsonLinesHandler
    timestamps: _Timestamps
    # (method, path, status) -> the line's JSON before and after its request id, redacted:
    # the same few routes answer nearly every request
    parts: dict[tuple[str, str, int], tuple[bytes, bytes]]

    def entry(self, method: str, path: str, status: int, request_id: str | None,
              seconds: float, sent_bytes: int, remote: str | None) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        key = (method, path, status)
        parts = self.parts.get(key)
        if parts is None:
            parts = self._parts(*key)
        self.handler.write_line(
            b'{"ts":"%s"%s%s%s,"duration_ms":%.3f,"bytes":%d,"remote":%s}' % (
                self.timestamps.now(), parts[0],
                b"" if request_id is None else b',"request_id":' + orjson.dumps(request_id),
                parts[1], seconds * 1000, sent_bytes, orjson.dumps(remote)))

    def _parts(self, method: str, path: str, status: int) -> tuple[bytes, bytes]:
        shown_method, shown_path = redact(method), redact(path)
        msg = redact(f"{shown_method} {shown_path} {status}")
        parts = (b',"level":"info","logger":%s,"msg":%s' % (orjson.dumps(self.logger.name),
                                                            orjson.dumps(msg)),
                 b',"method":%s,"path":%s,"status":%d' % (
                     orjson.dumps(shown_method), orjson.dumps(shown_path), status))
        if len(self.parts) >= ACCESS_PARTS_KEPT:  # paths are the caller's: bounded
            self.parts.clear()
        self.parts[(method, path, status)] = parts
        return parts


def flush_log() -> None:
    """Writes what the root logger's handlers keep: a serving process calls it as it ends (a
    forked worker exits without `logging`'s own flush at exit)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


def access_log_options(enabled: bool) -> dict[str, Any]:
    """Keyword arguments for web.AppRunner: the JSON access log, or none at all (some
    operators log at the gateway instead). With setup_logging's handler on the root logger,
    lines go to it directly (DirectAccessLogger), else through `logging`."""
    if not enabled:
        return {"access_log": None}
    logger = logging.getLogger("ratelimitd.access")
    handler = next((h for h in logging.getLogger().handlers
                    if isinstance(h, JsonLinesHandler)), None)
    if handler is None or logger.handlers or not logger.propagate:
        return {"access_log": logger, "access_log_class": JsonAccessLogger}
    bound = type("DirectAccessLogger", (DirectAccessLogger,),
                 {"handler": handler, "timestamps": _Timestamps(), "parts": {}})
    return {"access_log": logger, "access_log_class": bound}


def access_log_of(options: dict[str, Any]) -> AccessLog | None:
    """The access log that `options` (access_log_options) give aiohttp, for the answers the
    HTTP lane writes (http/lane.py)."""
    logger = options["access_log"]
    return None if logger is None else typing.cast(
        AccessLog, options["access_log_class"](logger, ""))


# -- noisy lines --------------------------------------------------------------------------------

@dataclass(slots=True)
class _Window:
    started: float
    logged: int = 0
    suppressed: int = 0


class ThrottledLog:
    """At most `per_window` lines per kind (a fixed string chosen by the code, such as
    "malformed_request") every `window_s` seconds; the lines past it are counted, and one
    summary line says how many were left out, when the next line of that kind arrives after
    the window or on flush() (which `run()` calls every window)."""

    def __init__(self, logger: logging.Logger, per_window: int = 10, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.per_window = per_window
        self.window_s = window_s
        self.clock = clock
        self._windows: dict[str, _Window] = {}

    def log(self, level: int, kind: str, msg: str, *args: object, exc_info: bool = False,
            **fields: Any) -> bool:
        """Logs unless this kind is over its allowance; True when the line was written.
        `exc_info`: with the traceback of the exception being handled."""
        now = self.clock()
        window = self._windows.get(kind)
        if window is None or now - window.started >= self.window_s:
            if window is not None:
                self._summarize(kind, window)
            window = self._windows[kind] = _Window(now)
        if window.logged >= self.per_window:
            window.suppressed += 1
            return False
        window.logged += 1
        self.logger.log(level, msg, *args, exc_info=exc_info, extra={"kind": kind, **fields})
        return True

    def warning(self, kind: str, msg: str, *args: object, **fields: Any) -> bool:
        return self.log(logging.WARNING, kind, msg, *args, **fields)

    def flush(self) -> None:
        """Summarizes the windows that are over (all of them when the daemon stops)."""
        now = self.clock()
        for kind, window in list(self._windows.items()):
            if now - window.started >= self.window_s:
                self._summarize(kind, window)
                del self._windows[kind]

    def flush_all(self) -> None:
        for kind, window in self._windows.items():
            self._summarize(kind, window)
        self._windows.clear()

    async def run(self) -> None:
        """Summaries even when a kind goes quiet: flush() every window until cancelled."""
        try:
            while True:
                await asyncio.sleep(self.window_s)
                self.flush()
        finally:
            self.flush_all()

    def _summarize(self, kind: str, window: _Window) -> None:
        if window.suppressed:
            self.logger.warning(
                "%d more %s lines left out (at most %d every %g s)", window.suppressed, kind,
                self.per_window, self.window_s,
                extra={"kind": kind, "suppressed": window.suppressed})
            window.suppressed = 0
