"""A normal (non-editable) install serves: the wheel carries every package and the Lua."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile
from pathlib import Path

import orjson

from ratelimitd.quota.scripts import script_names
from tests.support.redis_servers import RedisServer, free_port

REPO = Path(__file__).resolve().parent.parent


def _build_wheel(out: Path) -> Path:
    """Built from a copy of the sources: a build/ directory left in the checkout (setuptools
    copies a file into it only when the source is newer) cannot put stale code in the wheel."""
    sources = out.parent / "sources"
    shutil.copytree(REPO, sources, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache",
        ".hypothesis", "tests", "bench"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(sources)], check=True, capture_output=True)
    [wheel] = out.glob("ratelimitd-*.whl")
    return wheel


def test_the_wheel_installed_elsewhere_serves_a_reserve(tmp_path: Path,
                                                        redis_server: RedisServer) -> None:
    wheel = _build_wheel(tmp_path / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ratelimitd/lua/reserve.lua" in names and "ratelimitd/quota/wire.py" in names
    assert {f"ratelimitd/lua/scripts/{name}.lua" for name in script_names()} <= set(names)
    packages = {p.parent.relative_to(REPO).as_posix().replace("/", ".")
                for p in (REPO / "ratelimitd").rglob("__init__.py")}
    assert {f"{p.replace('.', '/')}/__init__.py" for p in packages} <= set(names)

    # A fresh virtualenv with the wheel; its dependencies come from this one's site-packages,
    # added as a plain path so that this checkout's editable install is not seen.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    port = free_port()
    config = outside / "ratelimitd.toml"
    config.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\n'
                      f'[redis]\nurl = "{redis_server.url}"\n')
    daemon = subprocess.Popen([str(venv / "bin" / "ratelimitd"), "serve", "--config",
                               str(config)], cwd=outside, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        answer = _reserve(port, daemon)
        assert answer["allowed"] is True and answer["reservation_id"].startswith("rsv_")
        where = subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import ratelimitd; print(ratelimitd.__file__)"],
                               cwd=outside, capture_output=True, text=True, check=True)
        assert where.stdout.startswith(str(site))           # not this checkout
    finally:
        daemon.terminate()
        daemon.wait(15)


def _reserve(port: int, daemon: subprocess.Popen[bytes]) -> dict[str, object]:
    body = orjson.dumps({"user": "packaged", "tier": "free", "model": "gpt-4o",
                         "input_tokens": 10})
    deadline = time.monotonic() + 30
    while True:
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/reserve", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=5) as resp:
                answer: dict[str, object] = orjson.loads(resp.read())
                return answer
        except OSError:
            if daemon.poll() is not None:
                raise AssertionError(daemon.stderr.read().decode() if daemon.stderr else "")
            assert time.monotonic() < deadline, "the installed daemon did not serve in 30 s"
            time.sleep(0.2)
