"""``HistoryStore``: the job history table on an asyncpg pool.

What the writer (``upsert``), the API and the CLI (``list_jobs``, ``get_job``, ``stats``) and the
retention job (``delete_older_than``) call; the console calls the same methods. Rows come back as
``JobRow`` (the table's column names; ``to_json()`` for an HTTP body), statistics as
``JobStats``.

The merge rule, the same in ``_merge`` (events of one batch for one job id) and in the upsert's
``ON CONFLICT`` (the batch's row against the stored one): an ended row (``succeeded``, ``dead``,
``cancelled``) is never moved back by a late ``started``/``progress``/``retrying``; between two
ended events the later one wins (a job that ran twice keeps its last outcome); otherwise the
higher ``(attempt, at)`` wins. ``attempts`` is the highest seen, ``created_at``/``started_at`` the
earliest.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from pydantic_core import to_json

from leveret.consumer.history.schema import JOBS_TABLE, LATEST
from leveret.consumer.history.schema import migrate as apply_migrations
from leveret.consumer.history.schema import pending as pending_migrations
from leveret.producers.broker import mask_url
from leveret.producers.wire import CANCELLED, DEAD, RETRYING, SUCCEEDED, JobEvent
from leveret.topology.errors import LeveretError

if TYPE_CHECKING:
    from asyncpg import Pool, Record

ENDED: Final[frozenset[str]] = frozenset({SUCCEEDED, DEAD, CANCELLED})
# The states a row can be in: the status object's names (``progress`` counts as ``started``).
ROW_STATES: Final[tuple[str, ...]] = ("started", RETRYING, SUCCEEDED, DEAD, CANCELLED)
MAX_LIMIT: Final = 1000
DEFAULT_LIMIT: Final = 50
RETENTION_BATCH: Final = 10_000

COLUMNS: Final[tuple[str, ...]] = (
    "id",
    "job",
    "queue",
    "state",
    "attempts",
    "payload",
    "result",
    "error",
    "progress",
    "message",
    "created_at",
    "started_at",
    "ended_at",
    "duration_s",
    "updated_at",
)
_SELECT: Final = ", ".join(COLUMNS)


class HistoryUnavailable(LeveretError):
    """The history database cannot be reached, or its schema is missing or behind."""


class InvalidQuery(LeveretError, ValueError):
    """A listing argument that cannot be used: a bad cursor, state, time or limit; ``field``
    names the argument where it is known."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class JobRow:
    """One ``leveret_jobs`` row; the fields are the table's columns."""

    id: str
    job: str
    queue: str
    state: str
    attempts: int
    payload: Any
    result: Any
    error: str | None
    progress: float | None
    message: str | None
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    duration_s: float | None
    updated_at: datetime

    @classmethod
    def from_record(cls, record: Record) -> JobRow:
        values = dict(record.items())
        for key in ("payload", "result"):
            if values[key] is not None:
                values[key] = json.loads(values[key])
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """The row as JSON-ready values (times as RFC 3339 text)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, datetime):
                out[key] = _rfc3339(value)
        return out


@dataclass(frozen=True, slots=True)
class JobStats:
    """Per job name: rows per state, duration percentiles of ended runs, and the failure rate
    (``dead`` / ended rows; ``None`` before any ended)."""

    job: str
    total: int
    counts: dict[str, int]
    p50: float | None
    p95: float | None
    p99: float | None
    failure_rate: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --- arguments --------------------------------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_moment(value: str, *, now: datetime | None = None) -> datetime:
    """``1h``, ``30m``, ``2d`` (that long ago) or an ISO 8601 time with an offset."""
    match = _DURATION.match(value)
    if match:
        seconds = float(match[1]) * _UNITS[match[2]]
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidQuery(
            f"{value!r} is neither a duration (90s, 30m, 1h, 2d, 1w) nor an ISO 8601 time"
        ) from None
    if moment.tzinfo is None:
        raise InvalidQuery(f"{value!r} has no UTC offset (add Z or +01:00)")
    return moment


def encode_cursor(created_at: datetime, job_id: str) -> str:
    raw = json.dumps([created_at.astimezone(UTC).isoformat(), job_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        moment, job_id = json.loads(raw)
        at = datetime.fromisoformat(moment)
        if at.tzinfo is None or not isinstance(job_id, str):
            raise ValueError(cursor)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidQuery(
            "invalid cursor: pass the next_cursor of a previous page", "cursor"
        ) from None
    return at, job_id


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- the merge --------------------------------------------------------------------------------


def _clean(text: str | None) -> str | None:
    """PostgreSQL text and jsonb refuse NUL; a handler's error may carry one."""
    return text.replace("\x00", "") if text is not None and "\x00" in text else text


@dataclass(slots=True)
class _Pending:
    """A batch's row for one job id, folded from its events in arrival order."""

    id: str
    job: str
    queue: str
    state: str
    attempts: int
    result: str | None
    error: str | None
    progress: float | None
    message: str | None
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    duration_s: float | None
    updated_at: datetime
    state_attempt: int = field(default=0)

    @classmethod
    def of(cls, event: JobEvent) -> _Pending:
        state = event.state if event.state in ENDED or event.state == RETRYING else "started"
        start: datetime | None = None
        if event.duration_s is not None:
            start = event.at - timedelta(seconds=event.duration_s)
        elif event.state == "started":
            start = event.at
        result = None
        if event.state == SUCCEEDED and event.result is not None:
            result = to_json(event.result).decode()
            if "\\u0000" in result:
                result = result.replace("\\u0000", "")
        return cls(
            id=event.job_id,
            job=event.job,
            queue=event.queue,
            state=state,
            attempts=event.attempt,
            result=result,
            error=_clean(event.error),
            progress=event.progress,
            message=_clean(event.message),
            created_at=start or event.at,
            started_at=start,
            ended_at=event.at if state in ENDED else None,
            duration_s=event.duration_s,
            updated_at=event.at,
            state_attempt=event.attempt,
        )

    def merge(self, new: _Pending) -> None:
        if wins(
            new.state,
            new.state_attempt,
            new.updated_at,
            self.state,
            self.state_attempt,
            self.updated_at,
        ):
            self.state, self.result, self.error = new.state, new.result, new.error
            self.ended_at, self.duration_s = new.ended_at, new.duration_s
            self.updated_at, self.state_attempt = new.updated_at, new.state_attempt
            self.job, self.queue = new.job, new.queue
        self.attempts = max(self.attempts, new.attempts)
        self.created_at = min(self.created_at, new.created_at)
        if new.started_at is not None:
            self.started_at = min(self.started_at or new.started_at, new.started_at)
        if new.progress is not None:
            self.progress, self.message = new.progress, new.message
        elif new.message is not None:
            self.message = new.message


def wins(
    new_state: str,
    new_attempt: int,
    new_at: datetime,
    old_state: str,
    old_attempt: int,
    old_at: datetime,
) -> bool:
    """Whether an event in ``new_state`` replaces a row's ``old_state`` (the module docstring's
    rule; ``_UPSERT`` says the same in SQL)."""
    if old_state in ENDED:
        return new_state in ENDED and new_at >= old_at
    if new_state in ENDED:
        return True
    return (new_attempt, new_at) >= (old_attempt, old_at)


def fold(events: Iterable[JobEvent]) -> list[_Pending]:
    """One row per job id from a batch's events, in first-seen order."""
    rows: dict[str, _Pending] = {}
    for event in events:
        row = _Pending.of(event)
        known = rows.get(row.id)
        if known is None:
            rows[row.id] = row
        else:
            known.merge(row)
    return list(rows.values())


_ENDED_SQL: Final = "('succeeded', 'dead', 'cancelled')"
_WINS: Final = f"""(CASE
    WHEN t.state IN {_ENDED_SQL}
        THEN EXCLUDED.state IN {_ENDED_SQL} AND EXCLUDED.updated_at >= t.updated_at
    WHEN EXCLUDED.state IN {_ENDED_SQL} THEN true
    ELSE (EXCLUDED.attempts, EXCLUDED.updated_at) >= (t.attempts, t.updated_at)
END)"""
_TAKEN: Final = ("state", "result", "error", "ended_at", "duration_s", "updated_at", "job", "queue")
_UPSERT: Final = f"""
INSERT INTO {JOBS_TABLE} AS t (
    id, job, queue, state, attempts, result, error, progress, message,
    created_at, started_at, ended_at, duration_s, updated_at
)
SELECT u.id, u.job, u.queue, u.state, u.attempts, u.result::jsonb, u.error, u.progress,
       u.message, u.created_at, u.started_at, u.ended_at, u.duration_s, u.updated_at
FROM unnest(
    $1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::text[], $7::text[],
    $8::float8[], $9::text[], $10::timestamptz[], $11::timestamptz[], $12::timestamptz[],
    $13::float8[], $14::timestamptz[]
) AS u(id, job, queue, state, attempts, result, error, progress, message,
       created_at, started_at, ended_at, duration_s, updated_at)
ON CONFLICT (id) DO UPDATE SET
    {", ".join(f"{c} = CASE WHEN {_WINS} THEN EXCLUDED.{c} ELSE t.{c} END" for c in _TAKEN)},
    attempts = GREATEST(t.attempts, EXCLUDED.attempts),
    created_at = LEAST(t.created_at, EXCLUDED.created_at),
    started_at = LEAST(t.started_at, EXCLUDED.started_at),
    progress = COALESCE(EXCLUDED.progress, t.progress),
    message = COALESCE(EXCLUDED.message, t.message)
"""


# --- the store --------------------------------------------------------------------------------


def transient(exc: BaseException) -> bool:
    """An error that another try may not hit: the server unreachable, restarting, shutting
    down, a connection lost, too many connections (the writer holds its batch and retries)."""
    import asyncpg

    if isinstance(exc, OSError | TimeoutError | asyncpg.InterfaceError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        code = getattr(exc, "sqlstate", "") or ""
        # 08: connection exception, 53: insufficient resources, 57: operator intervention
        # (admin shutdown, cannot connect now), 40: serialization failure / deadlock.
        return code[:2] in {"08", "53", "57", "40"}
    return False


class HistoryStore:
    """The history table behind an asyncpg pool, opened on first use."""

    def __init__(
        self,
        url: str,
        *,
        max_size: int = 4,
        connect_timeout: float = 5.0,
        command_timeout: float = 30.0,
    ) -> None:
        self._url = url
        self._max_size = max_size
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._pool: Pool | None = None

    @property
    def where(self) -> str:
        """The URL with its password masked, for logs and errors."""
        return mask_url(self._url)

    async def _get_pool(self) -> Pool:
        if self._pool is None:
            import asyncpg

            # min_size 0: creating the pool connects to nothing; the first query does.
            self._pool = await asyncpg.create_pool(
                self._url,
                min_size=0,
                max_size=self._max_size,
                timeout=self._connect_timeout,
                command_timeout=self._command_timeout,
            )
        return self._pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def _fetch(self, sql: str, *args: Any) -> list[Record]:
        import asyncpg

        pool = await self._get_pool()
        try:
            return list(await pool.fetch(sql, *args))
        except asyncpg.UndefinedTableError:
            raise HistoryUnavailable(
                f"the history schema is missing in {self.where}: run `leveret history migrate`"
            ) from None
        except Exception as exc:
            if transient(exc):
                raise HistoryUnavailable(
                    f"the history database {self.where} is unreachable: {type(exc).__name__}: {exc}"
                ) from exc
            raise

    # --- schema ---

    async def migrate(self) -> list[int]:
        """Apply the pending migrations (``leveret history migrate``); the versions applied."""
        pool = await self._get_pool()
        async with pool.acquire() as connection:
            return await apply_migrations(connection)

    async def pending_migrations(self) -> list[int]:
        pool = await self._get_pool()
        async with pool.acquire() as connection:
            return await pending_migrations(connection)

    @staticmethod
    def latest_version() -> int:
        return LATEST

    # --- writing ---

    async def upsert(self, events: Sequence[JobEvent]) -> int:
        """Write a batch of events as one multi-row upsert; the number of job rows written."""
        # In id order: two batches (two writers) locking the same rows never deadlock.
        rows = sorted(fold(events), key=lambda r: r.id)
        if not rows:
            return 0
        columns: list[list[Any]] = [[] for _ in range(14)]
        for r in rows:
            values = (
                r.id,
                r.job,
                r.queue,
                r.state,
                r.attempts,
                r.result,
                r.error,
                r.progress,
                r.message,
                r.created_at,
                r.started_at,
                r.ended_at,
                r.duration_s,
                r.updated_at,
            )
            for column, value in zip(columns, values, strict=True):
                column.append(value)
        pool = await self._get_pool()
        await pool.execute(_UPSERT, *columns)
        return len(rows)

    async def delete_older_than(self, days: int) -> int:
        """Delete rows created more than ``days`` days ago, in chunks (short transactions);
        the number deleted."""
        pool = await self._get_pool()
        cutoff = datetime.now(UTC) - timedelta(days=days)
        deleted = 0
        while True:
            status = await pool.execute(
                f"DELETE FROM {JOBS_TABLE} WHERE ctid = ANY(ARRAY("
                f"SELECT ctid FROM {JOBS_TABLE} WHERE created_at < $1 LIMIT {RETENTION_BATCH}))",
                cutoff,
            )
            count = int(status.split()[-1])
            deleted += count
            if count < RETENTION_BATCH:
                return deleted

    # --- reading ---

    async def list_jobs(
        self,
        state: str | None = None,
        job: str | None = None,
        queue: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
    ) -> tuple[list[JobRow], str | None]:
        """A page of rows, newest first (``created_at``, then ``id``), and the cursor of the
        next page (``None`` on the last)."""
        if state is not None and state not in ROW_STATES:
            raise InvalidQuery(f"unknown state {state!r}; one of {', '.join(ROW_STATES)}", "state")
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidQuery(f"limit must be 1 to {MAX_LIMIT}", "limit")
        where: list[str] = []
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        for column, value in (("state", state), ("job", job), ("queue", queue)):
            if value is not None and "\x00" in value:
                raise InvalidQuery(f"{column} contains a NUL character", column)
            if value is not None:
                where.append(f"{column} = {arg(value)}")
        if since is not None:
            where.append(f"created_at >= {arg(since)}")
        if until is not None:
            where.append(f"created_at < {arg(until)}")
        if cursor is not None:
            at, job_id = decode_cursor(cursor)
            where.append(f"(created_at, id) < ({arg(at)}, {arg(job_id)})")
        sql = (
            f"SELECT {_SELECT} FROM {JOBS_TABLE}"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + f" ORDER BY created_at DESC, id DESC LIMIT {arg(limit + 1)}"
        )
        records = await self._fetch(sql, *args)
        rows = [JobRow.from_record(r) for r in records[:limit]]
        more = len(records) > limit
        return rows, encode_cursor(rows[-1].created_at, rows[-1].id) if more else None

    async def get_job(self, job_id: str) -> JobRow | None:
        records = await self._fetch(f"SELECT {_SELECT} FROM {JOBS_TABLE} WHERE id = $1", job_id)
        return JobRow.from_record(records[0]) if records else None

    async def stats(self, since: datetime | None = None) -> list[JobStats]:
        """Per job name (rows created since ``since``; all rows without it)."""
        counts = ", ".join(f"count(*) FILTER (WHERE state = '{s}') AS {s}" for s in ROW_STATES)
        sql = f"""
            SELECT job, count(*) AS total, {counts},
                   percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY duration_s)
                       FILTER (WHERE state IN {_ENDED_SQL}) AS pct
            FROM {JOBS_TABLE} {"WHERE created_at >= $1" if since is not None else ""}
            GROUP BY job ORDER BY job
        """
        records = await self._fetch(sql, *([since] if since is not None else []))
        out = []
        for r in records:
            per_state = {s: int(r[s]) for s in ROW_STATES}
            ended = sum(per_state[s] for s in ENDED)
            pct = r["pct"] or [None, None, None]
            out.append(
                JobStats(
                    job=r["job"],
                    total=int(r["total"]),
                    counts=per_state,
                    p50=pct[0],
                    p95=pct[1],
                    p99=pct[2],
                    failure_rate=per_state[DEAD] / ended if ended else None,
                )
            )
        return out
