#!/usr/bin/env bash
# Sets up ratelimitd with its test tools (redis-server from Debian, a virtualenv) and runs the
# whole test suite (then its engine, HTTP and client parts again on Valkey), then the type and
# lint checks. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/pytest "$@"
bash scripts/test_valkey.sh -q "$@"
.venv/bin/mypy ratelimitd
.venv/bin/ruff check .
