#!/usr/bin/env bash
# Refreshes constraints.txt: installs ratelimitd[dev,embedded] with no constraints in a throwaway
# virtualenv, so pip takes the newest releases pyproject.toml admits, and writes their exact
# versions. Run it, then `bash scripts/test.sh`, and commit constraints.txt only if that passes.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --upgrade pip  # the newest pip resolves the newest set
"$tmp/venv/bin/pip" install -q ".[dev,embedded]"
{
    echo "# Exact versions that scripts/setup.sh installs (serve and test environments alike)."
    echo "# Written by scripts/lock.sh; refresh with: bash scripts/lock.sh && bash scripts/test.sh"
    "$tmp/venv/bin/pip" freeze --all --exclude ratelimitd | LC_ALL=C sort -f
} >constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages" >&2
