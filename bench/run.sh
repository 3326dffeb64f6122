#!/usr/bin/env bash
# One command for the whole benchmark: installs the bench dependency group if needed, then runs it.
#   bash bench/run.sh            full run (3 rounds, about 10-15 minutes), writes bench/RESULTS.md
#   bash bench/run.sh --quick    small sizes, one round
#   bash bench/run.sh --profile  py-spy profile of a worker, writes bench/PROFILE.md
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if ! "$PY" -c "import dramatiq, celery, faststream, taskiq_aio_pika, uvloop, redis" 2>/dev/null; then
  # Dependency groups need pip >= 25.1 (`--group`). The `status` extra brings redis, which the
  # status row and the peers' Redis result backends (dramatiq-results, celery-results) use.
  "$PY" -m pip install -q --upgrade "pip>=25.1"
  "$PY" -m pip install -q -e ".[status]" --group pyproject.toml:bench
fi
exec "$PY" -m bench "$@"
