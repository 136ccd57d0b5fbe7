#!/usr/bin/env bash
# Re-resolve constraints.txt: the newest versions pyproject.toml allows, installed into a
# throw-away venv, frozen. Then run scripts/test.sh and commit both if it is green.
# constraints.txt pins what the image (deploy/Dockerfile), CI and scripts/setup.sh install.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip
"$tmp/venv/bin/python" -m pip install -q '.[test]'
{
  echo "# Pinned, tested versions of every dependency (runtime and test extras) for $("$tmp/venv/bin/python" -V)."
  echo "# Used by deploy/Dockerfile, scripts/setup.sh and so CI. Refresh: scripts/refresh-constraints.sh"
  "$tmp/venv/bin/python" -m pip freeze --exclude delta-push
} > constraints.txt
echo "constraints.txt refreshed; now run scripts/test.sh"
