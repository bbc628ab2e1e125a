#!/usr/bin/env bash
# Installs what ratelimitd needs on a fresh Debian machine (as root) and leaves a virtualenv in
# .venv. `scripts/setup.sh dev` also installs the test and lint tools. Every Python package is
# installed at the exact version constraints.txt names (refresh it with scripts/lock.sh), so a new
# release of a dependency cannot break a fresh machine. Safe to run again: it reinstalls only
# when pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
    # Debian's redis-server package would start a system-wide Redis on port 6379; ratelimitd
    # starts its own, so keep the package's service from starting (policy-rc.d exit 101).
    export DEBIAN_FRONTEND=noninteractive
    local policy=/usr/sbin/policy-rc.d created=0
    if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created=1; fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    if [ "$created" = 1 ]; then rm -f "$policy"; fi
}

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
if [ "${1:-}" = bench ]; then command -v wrk >/dev/null 2>&1 || need+=(wrk); fi
# tests/ops checks the systemd unit with systemd-analyze (Debian's systemd package ships it)
if [ "${1:-}" = dev ]; then command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd); fi
# the documentation's examples, which the tests run, call curl, jq and openssl
if [ "${1:-}" = dev ]; then
    for tool in curl jq openssl; do command -v "$tool" >/dev/null 2>&1 || need+=("$tool"); done
fi
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "missing: ${need[*]}; install them (apt-get install ${need[*]}) or run as root" >&2
        exit 1
    fi
    apt_install "${need[@]}"
fi

extra=""
case "${1:-}" in dev|bench) extra="[dev]" ;; esac
# Install only when the virtualenv is missing or pyproject.toml or constraints.txt changed since
# the last install (a stamp holds their hash and the extra), so a restart needs no package index.
stamp=.venv/.ratelimitd-installed
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1) ${extra:-[]}"
have="$(cat "$stamp" 2>/dev/null || true)"
if [ -x .venv/bin/python ] && { [ "$have" = "$want" ] || { [ -z "$extra" ] && [ "${have%% *}" = "${want%% *}" ]; }; }; then
    echo "ratelimitd: .venv is up to date with pyproject.toml${extra:+ $extra}" >&2
    exit 0
fi
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q -c constraints.txt pip
fi
rm -f "$stamp"
.venv/bin/pip install -q -c constraints.txt -e ".${extra}"
echo "$want" >"$stamp"
