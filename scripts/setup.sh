#!/usr/bin/env bash
# Create .venv (if missing) and install delta-push with its test extras, at the pinned,
# tested versions of constraints.txt (refresh with scripts/refresh-constraints.sh). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e '.[test]'
  rm -f .venv/.installed-* && touch "$stamp"
fi
