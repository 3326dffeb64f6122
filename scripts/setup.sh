#!/usr/bin/env bash
# Everything a fresh Debian/Ubuntu machine needs to run Leveret's demo and tests:
# a RabbitMQ broker (found, or installed and started), its management API, and a venv.
# Idempotent; sourced by scripts/demo.sh and scripts/test.sh. Progress goes to stderr.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

ensure_broker() {
  if [ -n "${LEVERET_AMQP_URL:-}" ]; then
    say "using the broker in LEVERET_AMQP_URL"
    return
  fi
  if port_open 127.0.0.1 5672; then
    say "RabbitMQ answers on localhost:5672"
  elif command -v rabbitmq-server >/dev/null || [ -x /usr/sbin/rabbitmq-server ]; then
    say "starting the local rabbitmq-server"
    as_root rabbitmq-server -detached || true
  elif command -v apt-get >/dev/null; then
    say "installing rabbitmq-server from Debian's packages (once)"
    as_root apt-get update -qq >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >&2
    as_root rabbitmq-server -detached || true
  elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    say "starting RabbitMQ in Docker (rabbitmq:3.13-management)"
    docker run -d --rm --name leveret-rabbitmq -p 5672:5672 -p 15672:15672 \
      rabbitmq:3.13-management >/dev/null
  else
    say "no RabbitMQ found and no way to start one: set LEVERET_AMQP_URL"; exit 1
  fi
  for _ in $(seq 1 120); do port_open 127.0.0.1 5672 && break; sleep 0.5; done
  port_open 127.0.0.1 5672 || { say "RabbitMQ did not come up on localhost:5672"; exit 1; }
  if command -v rabbitmq-plugins >/dev/null && ! port_open 127.0.0.1 15672; then
    say "enabling the management plugin (UI on http://localhost:15672, guest/guest)"
    as_root rabbitmq-plugins enable rabbitmq_management rabbitmq_prometheus >/dev/null || true
  fi
  for _ in $(seq 1 120); do port_open 127.0.0.1 15672 && break; sleep 0.5; done
  # `rabbitmqctl await_startup` makes sure the node accepts connections, not just the port.
  if command -v rabbitmqctl >/dev/null; then as_root rabbitmqctl -q await_startup >&2 || true; fi
}

# ensure_redis: a Redis for the job status store (LEVERET_STATUS_URL) on localhost:6379: found,
# or started from an installed redis-server, or installed from Debian's packages and started.
# Returns non-zero (and says why) when there is no way to get one; callers decide if that is fatal.
ensure_redis() {
  if [ -n "${LEVERET_STATUS_URL:-}" ]; then
    say "using the Redis in LEVERET_STATUS_URL"
    return 0
  fi
  if port_open 127.0.0.1 6379; then
    say "Redis answers on localhost:6379"
    return 0
  fi
  if ! command -v redis-server >/dev/null; then
    if command -v apt-get >/dev/null; then
      say "installing redis-server from Debian's packages (once)"
      as_root apt-get update -qq >&2 || true
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >&2 || true
    fi
  fi
  if command -v redis-server >/dev/null; then
    say "starting redis-server on localhost:6379"
    redis-server --port 6379 --bind 127.0.0.1 --daemonize yes >/dev/null || true
    for _ in $(seq 1 40); do port_open 127.0.0.1 6379 && return 0; sleep 0.25; done
  fi
  say "no Redis on localhost:6379 and no way to start one (job status needs LEVERET_STATUS_URL)"
  return 1
}

# ensure_postgres: PostgreSQL's server binaries (initdb, pg_ctl) for the job history's tests
# (tests/history), which start a private cluster of their own in a temp dir (as the postgres user
# when run as root) and never touch a cluster of the machine. Installed from Debian's packages
# where missing; returns non-zero (and says why) when there is no way to get them.
ensure_postgres() {
  if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || [ -n "${LEVERET_TEST_PG_BIN:-}" ]; then
    return 0
  fi
  if command -v apt-get >/dev/null; then
    say "installing postgresql from Debian's packages (once; the job history's tests use it)"
    as_root apt-get update -qq >&2 || true
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2 || true
  fi
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && return 0
  say "no PostgreSQL server binaries (apt-get install postgresql, or set LEVERET_TEST_PG_BIN): the history tests will skip"
  return 1
}

# ensure_chromium: Debian's Chromium for the console's browser tests (tests/console), which
# Playwright drives through executable_path (LEVERET_CHROMIUM, default /usr/bin/chromium):
# Playwright's own browser download is never used. Installed from Debian's packages when missing;
# without a way to get it, says so and returns non-zero (those tests then fail, they never skip).
ensure_chromium() {
  local path="${LEVERET_CHROMIUM:-/usr/bin/chromium}"
  if [ -x "$path" ]; then return 0; fi
  if command -v apt-get >/dev/null; then
    say "installing chromium from Debian's packages (once; the console's browser tests use it)"
    as_root apt-get update -qq >&2 || true
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >&2 || true
  fi
  if [ -x "$path" ]; then return 0; fi
  say "no Chromium at $path (apt-get install chromium, or set LEVERET_CHROMIUM): the console's browser tests will fail"
  return 1
}

# ensure_venv [--extras NAME[,NAME...]] [GROUP...]: .venv with leveret installed editable (with
# its console script), the named extras of pyproject.toml (status, api, otel: what the demo or a
# feature needs at run time) and the named dependency groups (PEP 735: test, deploy, bench).
# Groups need `pip install --group` (pip >= 25.1), so pip is upgraded first.
ensure_venv() {
  local extras=""
  if [ "${1:-}" = "--extras" ]; then extras="$2"; shift 2; fi
  local groups=("$@") args=() group
  if [ ! -x "$ROOT/.venv/bin/python" ]; then
    say "creating the virtualenv in .venv"
    python3 -m venv "$ROOT/.venv"
  fi
  for group in "${groups[@]}"; do args+=(--group "$ROOT/pyproject.toml:$group"); done
  # The test group's playwright drives the system's Chromium (tests/console).
  for group in "${groups[@]}"; do [ "$group" = test ] && { ensure_chromium || true; }; done
  local name; name="$(IFS=,; echo "${groups[*]:-}")"
  local stamp="$ROOT/.venv/.leveret-installed-${name:-core}${extras:+-extras-${extras//,/-}}"
  if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
    say "installing leveret${extras:+[$extras]}${name:+ and the dependency groups $name} into .venv"
    local log="$ROOT/.venv/pip-install.log"
    if ! { "$ROOT/.venv/bin/python" -m pip install -q --upgrade "pip>=25.1" &&
           "$ROOT/.venv/bin/python" -m pip install -q -e "$ROOT${extras:+[$extras]}" "${args[@]}"; } \
         >"$log" 2>&1; then
      tail -n 30 "$log" >&2; say "pip install failed (full log: $log)"; exit 1
    fi
    touch "$stamp"
  fi
}
