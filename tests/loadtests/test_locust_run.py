"""A short Locust run (bash loadtests/run.sh 15) passes its verifier, and the verifier fails on
answers that show an over-admission or an attacker let through."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]
SECONDS = 15


@dataclass(frozen=True)
class Run:
    returncode: int
    output: str
    out: Path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    out = tmp_path_factory.mktemp("loadtest")
    done = subprocess.run(["bash", str(ROOT / "loadtests" / "run.sh"), str(SECONDS)],
                          env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LOADTEST_OUT": str(out)},
                          capture_output=True, text=True, timeout=SECONDS + 120, cwd=ROOT)
    yield Run(done.returncode, done.stdout + done.stderr, out)


def verify(config: Path, answers: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "loadtests" / "verify.py"), "--config",
                           str(config), "--answers", str(answers)],
                          capture_output=True, text=True, timeout=60)


def test_the_short_run_passes(run: Run) -> None:
    assert run.returncode == 0, run.output
    assert "PASS: no subject passed a limit; attackers stopped" in run.output
    stats = (run.out / "locust_stats.csv").read_text()
    assert "/v1/reserve" in stats and "/v1/commit" in stats
    answers = (run.out / "answers.jsonl").read_bytes().splitlines()
    classes = {orjson.loads(line)["cls"] for line in answers}
    assert classes == {"NormalGateway", "PromptBomb", "CredentialStuffing", "MultiAccount"}


def _lines(run: Run) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in (run.out / "answers.jsonl").read_bytes().splitlines()]


def _write(path: Path, entries: list[dict[str, object]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in entries))
    return path


def test_the_verifier_sees_an_over_admission(run: Run, tmp_path: Path) -> None:
    entries = _lines(run)
    grant = next(e for e in entries if e["cls"] == "PromptBomb" and e["status"] == 200)
    forged = [{**grant, "rid": f"rsv_forged_{i}"} for i in range(5)]  # five more at once
    done = verify(run.out / "config.toml", _write(tmp_path / "a.jsonl", entries + forged))
    assert done.returncode == 1
    assert "VIOLATION: tokens_per_minute (user bomb-victim)" in done.stdout
    assert "VIOLATION: max_concurrent (user bomb-victim)" in done.stdout


def test_the_verifier_sees_attackers_let_through_and_errors(run: Run, tmp_path: Path) -> None:
    entries = [e for e in _lines(run) if not (e["cls"] == "MultiAccount" and e["status"] == 429)]
    entries.append({**entries[-1], "op": "reserve", "cls": "NormalGateway", "status": 500})
    done = verify(run.out / "config.toml", _write(tmp_path / "b.jsonl", entries))
    assert done.returncode == 1
    assert "the multi-account farm was never denied by an ip_prefix limit" in done.stdout
    assert "NormalGateway: reserve answered 500" in done.stdout
