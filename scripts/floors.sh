#!/usr/bin/env bash
# Runs part of the suite against the *lowest* versions pyproject.toml allows (.ci/floors.txt),
# so a floor the code cannot run with fails CI instead of a user's install. Called by
# scripts/test.sh; on its own: `bash scripts/floors.sh [pytest args]` (needs a broker, as the
# suite does). Extra arguments go to pytest.
#
# The venv lives outside the work tree (LEVERET_FLOORS_VENV, default $TMPDIR/leveret-floors-venv)
# and is rebuilt only when .ci/floors.txt or pyproject.toml changes. Direct runtime dependencies
# are pinned to their floors; everything else (their own dependencies, the test tools) is the
# newest that fits, as with `uv --resolution lowest-direct`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FLOORS="$ROOT/.ci/floors.txt"
VENV="${LEVERET_FLOORS_VENV:-${TMPDIR:-/tmp}/leveret-floors-venv}"
say() { printf '\033[1m==>\033[0m floors: %s\n' "$*" >&2; }

# The subset: the tests that exercise the runtime dependencies' APIs (aio-pika/aiormq/pamqp in
# the worker and publisher, tenacity in retries and reconnects, pydantic(-settings) in validation
# and settings, prometheus-client and structlog in the worker, click in the CLI, rich and httpx in
# the operator commands, cronsim in schedules), against the real broker; and those of the
# extras' floors: redis (the status store, its worker and API use), fastapi/starlette/uvicorn
# (the HTTP API, served for real), opentelemetry-api (the run's span). The slow fault-injection
# and multi-process tests (tests/faults, tests/time's scheduler runs, tests/cluster), the
# benchmarks, the deploy checks, tests/api's schemathesis run (schemathesis needs a newer rich
# than our floor) and tests/topology (its declarations are exercised by every worker test) add
# minutes and no dependency API of their own, so they run only in the main pass. Needs Redis on
# localhost:6379 as the main pass does. About 5 minutes on a busy 2-core machine, plus a
# one-time install of about 2.
SUBSET=(
  tests/consumer tests/producers tests/e2e tests/cli
  tests/ops/test_status.py tests/ops/test_dlq_cli_tables.py tests/ops/test_schema.py
  tests/time/test_schedules.py
  tests/lifecycle/test_status_store.py tests/lifecycle/test_worker_status.py
  tests/api/test_api.py tests/api/test_api_cmd.py tests/api/test_cancel.py
  tests/api/test_dedup.py tests/api/test_end_to_end.py
  tests/handlers/test_tracing.py
)

stamp="$VENV/.leveret-floors"
if [ ! -f "$stamp" ] || [ "$FLOORS" -nt "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  say "installing the dependency floors into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  log="$VENV/pip-install.log"
  # The test tools come from pyproject's `test` dependency group, read rather than repeated.
  mapfile -t test_tools < <("$VENV/bin/python" - "$ROOT/pyproject.toml" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    # schemathesis pins a newer rich than our floor; only tests/api (not in the subset) uses it.
    tools = tomllib.load(f)["dependency-groups"]["test"]
    print("\n".join(t for t in tools if not t.startswith("schemathesis")))
EOF
)
  if ! { "$VENV/bin/python" -m pip install -q --upgrade pip &&
         "$VENV/bin/python" -m pip install -q -c "$FLOORS" -r "$FLOORS" "${test_tools[@]}" &&
         # The package itself, without letting pip re-resolve its dependencies.
         "$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2; say "pip install failed (full log: $log)"; exit 1
  fi
  touch "$stamp"
fi

# Refuse to pass on the wrong versions: every pin must be what is installed.
"$VENV/bin/python" - "$FLOORS" <<'EOF'
import sys
from importlib.metadata import version

wrong = []
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if line:
        name, pinned = line.split("==")
        if version(name) != pinned:
            wrong.append(f"{name} {version(name)} installed, floor is {pinned}")
if wrong:
    sys.exit("floors venv does not hold the floors: " + "; ".join(wrong))
EOF

cd "$ROOT"
say "pytest against $(grep -v '^#' "$FLOORS" | tr '\n' ' ')"
# No cache: the main run's .pytest_cache is not this venv's business.
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@" "${SUBSET[@]}"
