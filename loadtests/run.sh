#!/usr/bin/env bash
# Load test: a daemon on an embedded Redis, Locust headless against it on loopback, then the
# verifier. Usage: bash loadtests/run.sh [seconds]   (default 60; needs `scripts/setup.sh dev`)
#
# Writes to ${LOADTEST_OUT:-loadtests/out}: config.toml, daemon.log, answers.jsonl (every answer
# the daemon gave), locust_stats.csv (and Locust's other CSVs), verify.txt.
# Exits non-zero when the verifier finds a subject past a limit or an attacker not stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-60}"
case "$seconds" in ''|*[!0-9]*) echo "usage: $0 [seconds]" >&2; exit 2 ;; esac
py=.venv/bin/python
[ -x "$py" ] && [ -x .venv/bin/locust ] || { echo "run: bash scripts/setup.sh dev" >&2; exit 2; }

out="${LOADTEST_OUT:-loadtests/out}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
rm -f "$out"/answers.jsonl "$out"/locust_*.csv "$out"/verify.txt
state="$(mktemp -d -t ratelimitd-loadtest.XXXXXX)"
port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
daemon=""

cleanup() {
    if [ -n "$daemon" ] && kill -0 "$daemon" 2>/dev/null; then
        kill -TERM "$daemon"
        wait "$daemon" || true
    fi
    rm -rf "$state"
}
trap cleanup EXIT

# Tiers the locustfile expects. Small limits, so that the attackers meet them within seconds;
# every tier has an ip_prefix limit (per /24) that only the multi-account farm should reach.
cat >"$out/config.toml" <<EOF
[server]
listen = ["127.0.0.1:$port"]

[redis]
data_dir = "$state/redis"
# Locust shares the machine's CPUs with the daemon and Redis here: a call that waits for a CPU
# must not turn into a 503, which the verifier counts as an error, not a denial.
timeout_ms = 1000

[reservations]
ttl_s = 30

[tiers.gateway]
requests_per_minute = 120
tokens_per_day = 5000000
max_output_tokens = 2048
daily_budget_usd = 200.0
max_concurrent = 4

[[tiers.gateway.limits]]
name = "tokens_per_minute"
scope = "user"
metric = "tokens"
window = "60s"
limit = 120000

[[tiers.gateway.limits]]
name = "network_requests_per_minute"
scope = "ip_prefix"
metric = "requests"
window = "60s"
limit = 600

[tiers.free]
requests_per_minute = 20
tokens_per_day = 60000
max_output_tokens = 1000
daily_budget_usd = 0.5
max_concurrent = 2
max_input_tokens = 4000

[[tiers.free.limits]]
name = "tokens_per_minute"
scope = "user"
metric = "tokens"
window = "60s"
limit = 20000

[[tiers.free.limits]]
name = "network_requests_per_minute"
scope = "ip_prefix"
metric = "requests"
window = "60s"
limit = 40
EOF

# API keys need a pepper: one for this run (unless given), so credential stuffing meets the
# real key checks (401s, then 403 blocked past [abuse] auth_failures_per_ip).
RATELIMITD_KEY_PEPPER="${RATELIMITD_KEY_PEPPER:-$("$py" -c 'import secrets; print(secrets.token_hex(32))')}"
export RATELIMITD_KEY_PEPPER
.venv/bin/ratelimitd serve --config "$out/config.toml" >"$out/daemon.log" 2>&1 &
daemon=$!
ready=0
for _ in $(seq 1 150); do
    if "$py" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/readyz', timeout=1)" 2>/dev/null; then
        ready=1
        break
    fi
    kill -0 "$daemon" 2>/dev/null || break
    sleep 0.2
done
if [ "$ready" != 1 ]; then
    echo "the daemon did not become ready; see $out/daemon.log" >&2
    cat "$out/daemon.log" >&2
    exit 1
fi

# Locust's own exit code is not the verdict (it counts what the locustfile marks as failures,
# which the verifier reports too); a run that produced no CSV is.
LOADTEST_ANSWERS="$out/answers.jsonl" .venv/bin/locust -f loadtests/locustfile.py --headless \
    --host "http://127.0.0.1:$port" --users 37 --spawn-rate 37 --run-time "${seconds}s" \
    --stop-timeout 5 --csv "$out/locust" --only-summary --loglevel WARNING \
    >"$out/locust.log" 2>&1 || true
if [ ! -s "$out/locust_stats.csv" ]; then
    echo "locust wrote no statistics; see $out/locust.log" >&2
    cat "$out/locust.log" >&2
    exit 1
fi
column -s, -t <"$out/locust_stats.csv" 2>/dev/null | cut -c1-160 || cat "$out/locust_stats.csv"

status=0
"$py" loadtests/verify.py --config "$out/config.toml" --answers "$out/answers.jsonl" \
    | tee "$out/verify.txt" || status=$?
exit "$status"
