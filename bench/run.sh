#!/usr/bin/env bash
# Runs every benchmark; each measures its baseline in the same run. Installs wrk if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh bench
echo "== quota engine: Redis server time and memory (bench/engine_bench.py)"
.venv/bin/python bench/engine_bench.py "$@"
echo
echo "== daemon: HTTP throughput and latency (bench/http_bench.py)"
.venv/bin/python bench/http_bench.py
