"""Runs the examples of README.md and docs/*.md as a reader would, and compares what they show.

A page is read top to bottom; its fenced blocks are examples when their info string is `sh` or
`console`. The comment line right before a fence (blank lines between are allowed) may say:

- `<!-- not run: why -->`: the block is skipped, and the reason is reported;
- `<!-- file: NAME -->`: the block's text is written to NAME in the page's directory (any
  language: a configuration, a script) before the page's later blocks run.

An `sh` block runs with bash (`set -euo pipefail`) and must exit 0. A `console` block shows
`$ command` lines (a `> ` line continues the command), each followed by the output it prints
(stdout and stderr); `…` in the shown output stands for any text. Every command must exit 0.

All blocks of a page run in one temporary directory, in order, sharing exported variables and
shell variables, with HOME set to that directory (so the embedded Redis keeps its state there),
and `.venv/bin` (the one running the tests) first on PATH, as the README sets up. A command
that ends with ` &` starts a background process (its output goes to `background.log`): the runner
waits until the daemon answers `GET /readyz` and stops the process group when the page is done.
The documented address 127.0.0.1:8080 (or localhost:8080) is mapped to a free port, so pages run
beside other daemons.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[2]
PAGES: Final = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
RUN_LANGUAGES: Final = ("sh", "console")
DOCUMENTED_PORT: Final = 8080
ELLIPSIS: Final = "…"
COMMAND_TIMEOUT_S: Final = 60
READY_TIMEOUT_S: Final = 60

_END = "\x1eexit="   # ends a command's output in the runner's transcript
# a block's shell variables and exports, for the page's next block (bash's own left out)
_SAVE_STATE = """{{ for __name in $(compgen -v); do
    case " {baseline} " in *" $__name "*) ;; *) [[ $__name == __* ]] || declare -p "$__name";; esac
  done; export -p | grep -v -E '^declare -[a-zA-Z]*r'; }} >{state} 2>/dev/null"""
_FENCE = re.compile(r"^```(\S*)\s*$")
_MARKER = re.compile(r"^<!--\s*(not run|file):\s*(.+?)\s*-->\s*$")
_ADDRESS = re.compile(rf"\b(127\.0\.0\.1|localhost):{DOCUMENTED_PORT}\b")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int                # the opening fence's line, 1-based
    language: str
    text: str
    not_run: str | None      # the reason, when marked
    file: str | None         # the name to write it to, when marked

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.not_run is None and (self.file is not None or self.language in RUN_LANGUAGES)


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, with the marker that precedes each."""
    found: list[Block] = []
    lines = page.read_text().splitlines()
    marker: tuple[str, str] | None = None
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            match = _MARKER.match(lines[i].strip())
            if match is not None:
                marker = (match.group(1), match.group(2))
            elif lines[i].strip():
                marker = None
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")),
                   None)
        if end is None:
            raise ValueError(f"{page}:{i + 1}: a fence that never closes")
        kind, value = marker or ("", "")
        found.append(Block(page, i + 1, fence.group(1), "\n".join(lines[i + 1:end]) + "\n",
                           value if kind == "not run" else None,
                           value if kind == "file" else None))
        marker = None
        i = end + 1
    return found


@dataclass(frozen=True)
class Command:
    text: str
    shown: str               # the output the page shows


def console_commands(text: str) -> list[Command]:
    commands: list[Command] = []
    command: list[str] = []
    output: list[str] = []

    def flush() -> None:
        if command:
            commands.append(Command("\n".join(command), "\n".join(output)))

    for line in text.splitlines():
        if line.startswith("$ "):
            flush()
            command, output = [line[2:]], []
        elif line.startswith("> ") and command and not output:
            command.append(line[2:])
        elif not command:
            raise ValueError(f"console output before any `$ ` command: {line!r}")
        else:
            output.append(line)
    flush()
    return commands


def matches(shown: str, actual: str) -> bool:
    """`actual` is what `shown` shows, `…` standing for any text; trailing blanks ignored."""
    def norm(text: str) -> str:
        return "\n".join(line.rstrip() for line in text.strip().splitlines())
    pattern = ".*?".join(re.escape(part) for part in norm(shown).split(ELLIPSIS))
    return re.fullmatch(pattern, norm(actual), re.S) is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PageRun:
    """One page's directory, environment and background processes."""

    page: Path
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rldoc-")))
    port: int = field(default_factory=free_port)
    groups: list[int] = field(default_factory=list)   # process groups left running

    def __post_init__(self) -> None:
        self.state = self.directory / ".doc-state"
        venv_bin = Path(sys.executable).parent
        env = {"HOME": str(self.directory), "PATH": f"{venv_bin}:{os.environ['PATH']}",
               "LANG": "C.UTF-8", "TERM": "dumb"}
        for name in ("TMPDIR", "TIKTOKEN_CACHE_DIR", "RATELIMITD_TEST_SERVER"):
            if name in os.environ:
                env[name] = os.environ[name]
        self.base_env = env
        self.state.write_text("")

    def localize(self, text: str) -> str:
        return _ADDRESS.sub(lambda m: f"{m.group(1)}:{self.port}", text)

    def write(self, block: Block) -> None:
        assert block.file is not None
        target = self.directory / block.file
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(self.localize(block.text))

    def run(self, commands: list[str]) -> list[tuple[int, str]]:
        """Runs `commands` one after the other in one bash, in the page's shell state: each
        one's exit status and output."""
        script = [f"set -o pipefail\nsource {shlex.quote(str(self.state))}"]
        background = False
        for command in commands:
            text = self.localize(command)
            if re.search(r"[^&]&\s*$", text, re.M):
                background = True
                text = re.sub(r"(?<=[^&])&\s*$", ">>background.log 2>&1 &", text, flags=re.M)
            script.append(f"{text}\nprintf '\\n{_END}%d\\n' $?")
        script.append(_SAVE_STATE.format(baseline=" ".join(_baseline_names()),
                                         state=shlex.quote(str(self.state))))
        proc = subprocess.Popen(["bash", "-c", "\n".join(script)], cwd=self.directory,
                                env=self.base_env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        if background:
            self.groups.append(proc.pid)
        try:
            out, _ = proc.communicate(timeout=COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        results = _split(out.decode(errors="replace"))
        if background:
            self._wait_ready()
        return results + [(proc.returncode or 1, out.decode(errors="replace"))] * (
            len(commands) - len(results))

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        url = f"http://127.0.0.1:{self.port}/readyz"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            log = self.directory / "background.log"
            shown = log.read_text(errors="replace") if log.exists() else ""
            assert time.monotonic() < deadline, f"nothing ready on {url}:\n{shown}"
            time.sleep(0.05)

    def close(self) -> None:
        """Stops what the page started in the background (each by its own process group) and
        removes the page's directory."""
        for group in self.groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for group in self.groups:
            while time.monotonic() < deadline and _group_alive(group):
                time.sleep(0.05)
            if _group_alive(group):
                os.killpg(group, signal.SIGKILL)
        shutil.rmtree(self.directory, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@functools.cache
def _baseline_names() -> tuple[str, ...]:
    """The variables bash has by itself."""
    names = subprocess.run(["bash", "-c", "compgen -v"], capture_output=True, text=True,
                           check=True).stdout.split()
    return (*names, "BASH_REMATCH", "COLUMNS", "LINES")


def _split(transcript: str) -> list[tuple[int, str]]:
    parts = transcript.split(_END)
    out: list[tuple[int, str]] = []
    text = parts[0]
    for part in parts[1:]:
        status, _, rest = part.partition("\n")
        out.append((int(status), text.removesuffix("\n")))
        text = rest
    return out


def run_block(run: PageRun, block: Block) -> None:
    """Runs one block; AssertionError names the command and what differed."""
    if block.file is not None:
        run.write(block)
        return
    if block.language == "sh":
        [(rc, output)] = run.run([f"set -e\n{block.text}set +e"])
        assert rc == 0, f"{block.id}: exit {rc}\n{output}"
        return
    commands = console_commands(block.text)
    for command, (rc, output) in zip(commands, run.run([c.text for c in commands]),
                                     strict=True):
        assert rc == 0, f"{block.id}: `{command.text}` exit {rc}\n{output}"
        assert matches(run.localize(command.shown), output), (
            f"{block.id}: `{command.text}` printed\n{output}\nthe page shows\n{command.shown}")
