"""What the console's pages show, gathered from the broker, the status store and the history.

Every reader answers with what it could read and a note saying what it could not: a page never
fails because one source is down, and never shows a guess as a figure.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiormq

from leveret.consumer.features.schedules.leader import DEFAULT_APP, scheduler_queue_name
from leveret.consumer.ops.management import Management, ManagementError
from leveret.consumer.ops.overview import QueueStatus, from_management, from_passive
from leveret.producers.broker import CONNECTION_ERRORS
from leveret.producers.stores import JobStatus, StatusStore
from leveret.topology.delay import delay_queue_names
from leveret.topology.model import dlq_name

HISTORY_ENV = "LEVERET_HISTORY_URL"
MANAGEMENT_TIMEOUT_S = 3.0
# What a broker that is down or refusing raises to the console's readers.
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS,
    aiormq.exceptions.AMQPError,
    TimeoutError,
    OSError,
)
# The history's row states when its module cannot say (``ROW_STATES``).
FALLBACK_STATES = ("started", "retrying", "succeeded", "dead", "cancelled")


def work_queues(worker: Any) -> list[str]:
    """The app's work queues: every registered job's queue."""
    return sorted({spec.queue for spec in worker.jobs.jobs.values()})


@dataclass
class Consumer:
    queue: str
    connection: str
    peer: str
    tag: str
    prefetch: int | None
    active: bool


@dataclass
class QueuesView:
    rows: list[QueueStatus]
    delayed: int | None
    workers: list[dict[str, Any]]
    source: str
    note: str | None = None


async def _consumers(api: Management) -> list[Consumer]:
    out = []
    for c in await api.get(f"/consumers/{api.qvhost}") or []:
        channel = c.get("channel_details") or {}
        out.append(
            Consumer(
                queue=(c.get("queue") or {}).get("name", ""),
                connection=str(channel.get("connection_name") or ""),
                peer=f"{channel.get('peer_host', '?')}:{channel.get('peer_port', '?')}",
                tag=str(c.get("consumer_tag") or ""),
                prefetch=c.get("prefetch_count"),
                active=bool(c.get("active", True)),
            )
        )
    return out


def _workers(consumers: list[Consumer], queues: list[str]) -> list[dict[str, Any]]:
    """One row per connection consuming a work queue: who it is and what it consumes."""
    by_conn: dict[str, dict[str, Any]] = {}
    wanted = set(queues)
    for c in consumers:
        if c.queue not in wanted:
            continue
        row = by_conn.setdefault(
            c.connection, {"connection": c.connection, "peer": c.peer, "queues": [], "prefetch": 0}
        )
        row["queues"].append(c.queue)
        row["prefetch"] += c.prefetch or 0
    for row in by_conn.values():
        row["queues"] = sorted(set(row["queues"]))
    return sorted(by_conn.values(), key=lambda r: str(r["connection"]))


async def queues_view(worker: Any) -> QueuesView:
    """Per work queue: ready, running (unacked), dead, consumers, rates; the delay chain's total
    (shared by every queue of the exchange); the workers connected."""
    settings = worker.settings
    queues = work_queues(worker)
    api = Management.from_settings(settings, timeout_s=MANAGEMENT_TIMEOUT_S)
    try:
        rows, consumers = await asyncio.gather(
            from_management(api, queues, settings.exchange), _consumers(api)
        )
        source, note = f"management API at {api.target.display}", None
    except ManagementError as exc:
        consumers = []
        source = "passive declares"
        note = f"{exc}. Unacked counts, rates and workers need the management API."
        try:
            rows = await from_passive(settings, queues)
        except BROKER_ERRORS as broker_exc:
            rows, source = [], "nothing"
            note = f"{note} The broker did not answer either: {type(broker_exc).__name__}."
    delayed = None
    work = []
    for row in rows:
        if row.queue.endswith(".delay.*"):
            delayed = row.retrying
        else:
            work.append(row)
    return QueuesView(work, delayed, _workers(consumers, queues), source, note)


# --- jobs -----------------------------------------------------------------------------------


@dataclass
class History:
    """The history store when ``LEVERET_HISTORY_URL`` is set and the module is installed."""

    store: Any | None
    why_not: str | None
    states: tuple[str, ...] = FALLBACK_STATES


def open_history() -> History:
    """One ``HistoryStore`` (its pool opens on first use), or why there is none."""
    url = os.environ.get(HISTORY_ENV)
    if not url:
        return History(None, f"{HISTORY_ENV} is not set")
    try:
        from leveret.consumer.history.store import ROW_STATES, HistoryStore
    except ImportError as exc:
        return History(None, f"the history store cannot be imported ({exc})")
    try:
        store = HistoryStore(url)
    except Exception as exc:
        return History(None, f"the history store could not be opened: {type(exc).__name__}: {exc}")
    return History(store, None, tuple(ROW_STATES))


def _field(row: Any, name: str) -> Any:
    if row is None:
        return None
    if isinstance(row, dict):
        return row.get(name)
    return getattr(row, name, None)


def as_row(row: Any) -> dict[str, Any]:
    """A history row (``JobRow``) as the table's columns, times as UTC ISO text."""
    out = {}
    for name in ("id", "job", "queue", "state", "attempts", "error", "created_at", "updated_at",
                 "started_at", "ended_at", "duration_s"):  # fmt: skip
        value = _field(row, name)
        out[name] = iso(value) if isinstance(value, datetime) else value
    return out


def _error(exc: Exception) -> str:
    return f"the history store failed: {type(exc).__name__}: {exc}"


async def list_jobs(
    history: History,
    state: str | None,
    job: str | None,
    queue: str | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[dict[str, Any]], str | None, str | None]:
    """``(rows, next_cursor, error)`` from the history store, newest first."""
    if history.store is None:
        return [], None, history.why_not
    try:
        rows, next_cursor = await history.store.list_jobs(
            state=state, job=job, queue=queue, since=None, until=None, limit=limit, cursor=cursor
        )
    except Exception as exc:
        return [], None, _error(exc)
    return [as_row(r) for r in rows], next_cursor, None


async def history_job(history: History, job_id: str) -> tuple[Any, str | None]:
    if history.store is None:
        return None, None
    try:
        return await history.store.get_job(job_id), None
    except Exception as exc:
        return None, _error(exc)


async def history_counts(history: History, since: datetime | None) -> dict[str, int] | None:
    """Rows per state over every job name (``stats`` is per job name)."""
    if history.store is None:
        return None
    try:
        stats = await history.store.stats(since=since)
    except Exception:
        return None
    out: dict[str, int] = {}
    for per_job in stats:
        for state, n in (_field(per_job, "counts") or {}).items():
            out[state] = out.get(state, 0) + int(n or 0)
    return out


def timeline(status: JobStatus | None, hjob: Any) -> list[tuple[str, str]]:
    """``(what, utc iso)`` in time order: published, started, ended, last update; from the
    status store, else from the history row."""
    src: Any = status if status is not None else hjob
    if src is None:
        return []
    state = str(_field(src, "state"))
    ended = state in ("succeeded", "dead", "cancelled")
    out = []
    for what, name in (("published", "created_at"), ("started", "started_at"),
                       (state if ended else "ended", "ended_at"),
                       ("last update" if not ended else "", "updated_at")):  # fmt: skip
        at = _field(src, name)
        if at is not None and what:
            out.append((what, iso(at)))
    return sorted(out, key=lambda e: e[1])


def iso(value: Any) -> str:
    """UTC ISO 8601 text for a datetime, an epoch number or ISO text."""
    if isinstance(value, datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        return str(aware.astimezone(UTC).isoformat()).replace("+00:00", "Z")
    if isinstance(value, int | float):
        return iso(datetime.fromtimestamp(value, UTC))
    return str(value)


# --- schedules ------------------------------------------------------------------------------


@dataclass
class ScheduleRow:
    name: str
    job: str
    expression: str
    tz: str
    next_fire: str
    last_tick: str | None
    last_state: str | None
    last_job_id: str | None = None


@dataclass
class SchedulesView:
    rows: list[ScheduleRow]
    election_queue: str
    leader: str | None
    standby: int
    note: str | None = None
    tokens_ready: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


async def schedules_view(worker: Any, store: StatusStore | None) -> SchedulesView:
    now = datetime.now(UTC)
    rows = []
    for s in worker.schedules:
        last = s.latest_at_or_before(now)
        state = None
        if last is not None and store is not None:
            try:
                status = await store.get(s.job_id(last))
                state = status.state if status is not None else "not fired"
            except Exception:
                state = None
        rows.append(
            ScheduleRow(
                s.name,
                s.job,
                s.expression,
                s.tz,
                iso(s.next_after(now)),
                iso(last) if last is not None else None,
                state,
                s.job_id(last) if last is not None else None,
            )
        )
    queue = scheduler_queue_name(worker.settings.exchange, DEFAULT_APP)
    view = SchedulesView(rows, queue, None, 0)
    if not worker.schedules:
        return view
    api = Management.from_settings(worker.settings, timeout_s=MANAGEMENT_TIMEOUT_S)
    try:
        info = await api.get(f"/queues/{api.qvhost}/{quote(queue, safe='')}")
    except ManagementError as exc:
        view.note = (
            f"which process leads is read from the management API: {exc}"
            if exc.status != 404
            else f"no election queue {queue} yet: no worker of this app has run its scheduler"
        )
        return view
    view.tokens_ready = info.get("messages_ready")
    details = info.get("consumer_details") or []
    for c in details:
        channel = c.get("channel_details") or {}
        who = f"{channel.get('connection_name') or '?'} ({channel.get('peer_host', '?')})"
        if c.get("activity_status", "single_active") == "single_active" and view.leader is None:
            view.leader = who
        else:
            view.standby += 1
    if view.leader is None:
        view.note = "no scheduler is consuming the election queue: no process leads"
    return view


def dlq_names(worker: Any) -> list[str]:
    return [dlq_name(q) for q in work_queues(worker)]


def delay_names(exchange: str) -> list[str]:
    return list(delay_queue_names(exchange))


class Timer:
    """Server time of a page, for the ``Server-Timing`` header."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def ms(self) -> float:
        return (time.perf_counter() - self.start) * 1000
