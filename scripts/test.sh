#!/usr/bin/env bash
# The test command: set up, lint, then run every test against real redis-server processes.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
command -v redis-server >/dev/null || { echo "redis-server is required (apt-get install redis-server)" >&2; exit 1; }
.venv/bin/ruff check .
if command -v node >/dev/null; then node --test web/test/; fi  # the browser client's unit tests
.venv/bin/python -m pytest "$@"
