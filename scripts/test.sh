#!/usr/bin/env bash
# Sets up everything (broker, management API, venv, deploy tools), runs part of the suite on the
# lowest dependency versions pyproject allows (scripts/floors.sh), then the whole test suite,
# against the real broker. Extra arguments go to the whole suite's pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
ensure_broker
ensure_redis  # the lifecycle tests use the machine's Redis (their own database and prefix)
ensure_postgres || true  # the history tests start a private PostgreSQL cluster from its binaries
# Every extra (status, api, otel, history): mypy type-checks the code behind each one (producers/stores/status.py,
# consumer/api/, consumer/features/tracing.py) against the installed library, never against a missing one.
ensure_venv --extras status,api,otel,history test deploy
if [ -f "$ROOT/.ci/deploy-tools.sh" ]; then bash "$ROOT/.ci/deploy-tools.sh"; fi
cd "$ROOT"

# Steps, in order; each stops the run when it fails.
# 1. Static checks: lint, then the strict type check of the package (config: pyproject's
#    [tool.mypy]; `-p leveret` from the root follows the symlinked topology/producers/consumer).
say "ruff"
.venv/bin/ruff check .
say "mypy --strict"
.venv/bin/mypy -p leveret

# 2. The documentation site (mkdocs.yml; the `docs` dependency group): docs/ built with
#    --strict, so a link to a missing page or anchor fails the run. Never with -q: mkdocs' quiet
#    mode hides the warnings from --strict's count and lets a broken link through.
ensure_venv docs
say "mkdocs build --strict (the docs site, into build/site)"
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict

# 3. The dependency floors: part of the suite against the lowest versions pyproject allows.
say "pytest on the dependency floors (.ci/floors.txt)"
bash "$ROOT/scripts/floors.sh" -q

# 4. The whole suite on the current dependencies (last: its exit code is the run's).
say "pytest"
exec .venv/bin/python -m pytest "$@"
