"""The history schema as numbered migrations, applied by ``leveret history migrate``.

Each migration is one SQL string, applied together with the row that records it in
``leveret_schema_migrations``; a run applies every pending one in one transaction that holds an
advisory lock, so two ``migrate`` runs at once apply each version exactly once.
Running it again changes nothing. A migration, once released, is never edited: a change is a
new, higher version.

``leveret_jobs`` is one row per job id (see docs/operations.md, "The job history"):

- ``id``, ``job``, ``queue``: the job id, its name and queue;
- ``state``: the last known state, the status object's names (``started``, ``retrying``,
  ``succeeded``, ``dead``, ``cancelled``); an ended row is never moved back by a late event;
- ``attempts``: the highest attempt seen;
- ``payload``: the job's payload (jsonb), null while the lifecycle events do not carry it;
- ``result`` (jsonb), ``error``, ``progress``, ``message``: from the events;
- ``created_at``: when the history first knows of the job (the earliest run start it saw: the
  events carry no publish time), ``started_at``: the first run's start, ``ended_at``: the
  outcome's time, ``duration_s``: the last run's handler time, ``updated_at``: the time of the
  event that set ``state``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from asyncpg import Connection as PlainConnection
    from asyncpg.pool import PoolConnectionProxy

    Connection = PlainConnection[Any] | PoolConnectionProxy[Any]

MIGRATIONS_TABLE: Final = "leveret_schema_migrations"
JOBS_TABLE: Final = "leveret_jobs"

# version -> SQL. Append only.
MIGRATIONS: Final[dict[int, str]] = {
    1: """
CREATE TABLE leveret_jobs (
    id          text PRIMARY KEY,
    job         text NOT NULL,
    queue       text NOT NULL,
    state       text NOT NULL,
    attempts    integer NOT NULL DEFAULT 0,
    payload     jsonb,
    result      jsonb,
    error       text,
    progress    double precision,
    message     text,
    created_at  timestamptz NOT NULL,
    started_at  timestamptz,
    ended_at    timestamptz,
    duration_s  double precision,
    updated_at  timestamptz NOT NULL
);
-- The listing: newest first, keyset on (created_at, id); one index per filter it is used with.
CREATE INDEX leveret_jobs_created ON leveret_jobs (created_at DESC, id DESC);
CREATE INDEX leveret_jobs_state_created ON leveret_jobs (state, created_at DESC, id DESC);
CREATE INDEX leveret_jobs_job_created ON leveret_jobs (job, created_at DESC, id DESC);
CREATE INDEX leveret_jobs_queue_created ON leveret_jobs (queue, created_at DESC, id DESC);
""",
}

LATEST: Final = max(MIGRATIONS)

_CREATE_TABLE: Final = f"""
CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (
    version    integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
# Any constant: the key every migrate run of every process takes.
_LOCK_KEY: Final = 0x6C657665726574  # "leveret"


async def applied_versions(connection: Connection) -> set[int]:
    """The versions recorded as applied (an empty set before the first migrate)."""
    exists = await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", MIGRATIONS_TABLE)
    if not exists:
        return set()
    rows = await connection.fetch(f"SELECT version FROM {MIGRATIONS_TABLE}")
    return {int(row["version"]) for row in rows}


async def pending(connection: Connection) -> list[int]:
    """The versions this release has and the database has not applied, in order."""
    done = await applied_versions(connection)
    return [v for v in sorted(MIGRATIONS) if v not in done]


async def migrate(connection: Connection) -> list[int]:
    """Apply every pending migration; return the versions applied now (empty: up to date)."""
    applied: list[int] = []
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await connection.execute(_CREATE_TABLE)
        done = await applied_versions(connection)
        for version in sorted(MIGRATIONS):
            if version in done:
                continue
            async with connection.transaction():  # a savepoint per version
                await connection.execute(MIGRATIONS[version])
                await connection.execute(
                    f"INSERT INTO {MIGRATIONS_TABLE} (version) VALUES ($1)", version
                )
            applied.append(version)
    return applied
