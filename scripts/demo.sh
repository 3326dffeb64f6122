#!/usr/bin/env bash
# The README's demo: finds or starts a broker, installs Leveret in .venv, runs a worker,
# publishes jobs (one retries, some end in the DLQ) and shows what happened; with Redis, it also
# runs the order pipeline of examples/orders (orders POSTed to its HTTP API, followed to
# order_done). Exits 0 by itself; `scripts/demo.sh --keep` leaves the workers and the web consoles
# running for exploring (it prints their URLs and the tokens to sign in with).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
ensure_broker
# Redis is optional for the demo: with it, the demo also shows a job's status changing and runs
# the order pipeline (its locks, idempotency keys and groups live in Redis); without, it says so.
if ensure_redis && [ -z "${LEVERET_STATUS_URL:-}" ]; then
  export LEVERET_STATUS_URL=redis://127.0.0.1:6379/0
fi
# The package with the extras the demo uses (status: the Redis job status store it sets up above;
# api: the HTTP APIs and web consoles, the order pipeline's orders come in through one), nothing
# from the dev groups.
ensure_venv --extras status,api
cd "$ROOT/examples"
exec "$ROOT/.venv/bin/python" demo.py "$@"
