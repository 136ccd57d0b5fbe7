#!/usr/bin/env bash
# The run command: set up, then start a local cluster (router on 8080, nodes on 8081...).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/pushctl up "$@"
