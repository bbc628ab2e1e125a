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
echo
echo "== one daemon: 3-primary cluster against standalone (bench/cluster_bench.py)"
.venv/bin/python bench/cluster_bench.py
echo
echo "== the hot path's client: pipelined against valkey-glide, replicas_ack (bench/transport_bench.py)"
.venv/bin/python bench/transport_bench.py
echo
echo "== memory per worker (bench/memory_bench.py)"
.venv/bin/python bench/memory_bench.py
