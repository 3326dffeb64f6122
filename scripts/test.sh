#!/usr/bin/env bash
# Sets up everything (broker, management API, venv, deploy tools) and runs the whole test suite
# against the real broker. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
ensure_broker
ensure_venv "test,deploy"
if [ -f "$ROOT/.ci/deploy-tools.sh" ]; then bash "$ROOT/.ci/deploy-tools.sh"; fi
cd "$ROOT"
say "ruff"
.venv/bin/ruff check .
say "pytest"
exec .venv/bin/python -m pytest "$@"
