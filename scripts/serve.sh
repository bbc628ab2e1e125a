#!/usr/bin/env bash
# Sets up ratelimitd (redis-server from Debian, a virtualenv: both only when missing or when
# pyproject.toml changed) and starts the daemon in the foreground on an embedded Redis.
# Arguments go to `ratelimitd serve`, e.g. --config FILE.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ratelimitd serve "$@"
