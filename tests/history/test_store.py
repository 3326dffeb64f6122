"""HistoryStore against a real PostgreSQL (a private cluster, a database per test)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from leveret.consumer.history.schema import LATEST, MIGRATIONS_TABLE
from leveret.consumer.history.store import (
    HistoryStore,
    HistoryUnavailable,
    InvalidQuery,
    decode_cursor,
    parse_moment,
)
from leveret.producers.wire.events import JobEvent

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def ev(job_id: str, state: str, attempt: int, at_s: float, **kw: Any) -> JobEvent:
    body: dict[str, Any] = {
        "job_id": job_id,
        "job": kw.pop("job", "send"),
        "queue": kw.pop("queue", "q"),
        "state": state,
        "attempt": attempt,
        "at": T0 + timedelta(seconds=at_s),
        **kw,
    }
    return JobEvent.model_validate(body)


async def test_migrate_twice_changes_nothing(history_url: str) -> None:
    store = HistoryStore(history_url)
    try:
        assert await store.pending_migrations() == list(range(1, LATEST + 1))
        assert await store.migrate() == list(range(1, LATEST + 1))
        conn = await asyncpg.connect(history_url)
        try:
            before = await conn.fetch(
                "SELECT tablename, indexname, indexdef FROM pg_indexes "
                "WHERE schemaname = 'public' ORDER BY 1, 2"
            )
            versions = await conn.fetch(f"SELECT version, applied_at FROM {MIGRATIONS_TABLE}")
            assert await store.migrate() == []
            assert await store.pending_migrations() == []
            after = await conn.fetch(
                "SELECT tablename, indexname, indexdef FROM pg_indexes "
                "WHERE schemaname = 'public' ORDER BY 1, 2"
            )
            assert before == after
            assert versions == await conn.fetch(
                f"SELECT version, applied_at FROM {MIGRATIONS_TABLE}"
            )
        finally:
            await conn.close()
    finally:
        await store.close()


async def test_outcomes_merge_into_one_row_per_job(store: HistoryStore) -> None:
    # a retried job: retrying(1), then succeeded(2); in one batch
    await store.upsert(
        [
            ev("a", "retrying", 1, 10, duration_s=2.0, error="boom"),
            ev("a", "succeeded", 2, 20, duration_s=1.5, result={"n": 1}),
            ev("b", "dead", 3, 30, duration_s=0.5, error="bad\x00"),
        ]
    )
    a = await store.get_job("a")
    assert a is not None
    assert (a.state, a.attempts, a.duration_s, a.result, a.error) == (
        "succeeded",
        2,
        1.5,
        {"n": 1},
        None,
    )
    assert a.started_at == T0 + timedelta(seconds=8)  # the first run's start
    assert a.ended_at == T0 + timedelta(seconds=20)
    b = await store.get_job("b")
    assert b is not None and (b.state, b.attempts, b.error) == ("dead", 3, "bad")
    # late events never move an ended row back; attempts keep the max
    await store.upsert([ev("a", "retrying", 1, 10, duration_s=2.0), ev("a", "started", 2, 18.5)])
    a2 = await store.get_job("a")
    assert a2 is not None and (a2.state, a2.attempts, a2.result) == ("succeeded", 2, {"n": 1})
    # a job that ran twice (redelivered after a crash, both runs succeeded): one row, last outcome
    await store.upsert([ev("a", "succeeded", 2, 25, duration_s=3.0, result={"n": 2})])
    a3 = await store.get_job("a")
    assert a3 is not None and (a3.state, a3.duration_s, a3.result) == ("succeeded", 3.0, {"n": 2})
    # an earlier-ended duplicate arriving late does not replace the later outcome
    await store.upsert([ev("a", "succeeded", 2, 21, duration_s=9.0, result={"n": 0})])
    a4 = await store.get_job("a")
    assert a4 is not None and a4.result == {"n": 2}
    # across batches: retrying(2) after retrying(1) wins; retrying(1) after retrying(2) does not
    await store.upsert([ev("c", "retrying", 2, 40, duration_s=1.0)])
    await store.upsert([ev("c", "retrying", 1, 35, duration_s=1.0)])
    c = await store.get_job("c")
    assert c is not None and (c.state, c.attempts, c.updated_at) == (
        "retrying",
        2,
        T0 + timedelta(seconds=40),
    )
    await store.upsert([ev("c", "progress", 3, 50, progress=0.5, message="half")])
    c2 = await store.get_job("c")
    assert c2 is not None and (c2.state, c2.attempts, c2.progress, c2.message) == (
        "started",
        3,
        0.5,
        "half",
    )
    rows, cursor = await store.list_jobs()
    assert sorted(r.id for r in rows) == ["a", "b", "c"] and cursor is None


async def test_listing_pages_and_filters(store: HistoryStore) -> None:
    events = []
    for i in range(25):
        state = ("succeeded", "dead", "retrying")[i % 3]
        events.append(
            ev(
                f"j{i:02d}",
                state,
                1,
                i,
                duration_s=0.1,
                job=("a", "b")[i % 2],
                queue=("q1", "q2")[i % 2],
            )
        )
    await store.upsert(events)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        rows, cursor = await store.list_jobs(limit=10, cursor=cursor)
        seen += [r.id for r in rows]
        pages += 1
        if cursor is None:
            break
    assert pages == 3
    assert seen == [f"j{i:02d}" for i in reversed(range(25))]  # newest first, nothing twice
    rows, _ = await store.list_jobs(state="dead", limit=100)
    assert [r.id for r in rows] == [f"j{i:02d}" for i in reversed(range(25)) if i % 3 == 1]
    rows, _ = await store.list_jobs(job="a", queue="q1", state="succeeded", limit=100)
    assert [r.id for r in rows] == [f"j{i:02d}" for i in reversed(range(25)) if i % 6 == 0]
    # created_at is the run's start (at - duration)
    since = T0 + timedelta(seconds=10 - 0.1)
    until = T0 + timedelta(seconds=15 - 0.1)
    rows, _ = await store.list_jobs(since=since, until=until)
    assert [r.id for r in rows] == ["j14", "j13", "j12", "j11", "j10"]
    with pytest.raises(InvalidQuery):
        await store.list_jobs(cursor="nonsense!")
    with pytest.raises(InvalidQuery):
        await store.list_jobs(state="queued")
    with pytest.raises(InvalidQuery):
        await store.list_jobs(limit=0)
    js = rows[0].to_json()
    assert js["created_at"].endswith("Z") and js["id"] == "j14"


def test_cursor_and_moment_parsing() -> None:
    with pytest.raises(InvalidQuery):
        decode_cursor("e30")  # "{}"
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_moment("1h", now=now) == now - timedelta(hours=1)
    assert parse_moment("2026-01-01T00:00:00Z") == now
    with pytest.raises(InvalidQuery):
        parse_moment("2026-01-01T00:00:00")
    with pytest.raises(InvalidQuery):
        parse_moment("yesterday")


async def test_stats(store: HistoryStore) -> None:
    events = [ev(f"s{i}", "succeeded", 1, i, duration_s=float(i + 1), job="a") for i in range(100)]
    events += [ev(f"d{i}", "dead", 3, i, duration_s=1.0, job="a") for i in range(25)]
    events += [ev("r", "retrying", 1, 1, duration_s=1.0, job="b")]
    await store.upsert(events)
    stats = {s.job: s for s in await store.stats()}
    a = stats["a"]
    assert a.total == 125 and a.counts["succeeded"] == 100 and a.counts["dead"] == 25
    assert a.failure_rate == pytest.approx(0.2)
    conn = await asyncpg.connect(store._url)
    try:
        expected = await conn.fetchrow(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d) AS p50, "
            "percentile_cont(0.99) WITHIN GROUP (ORDER BY d) AS p99 "
            "FROM (SELECT generate_series(1, 100)::float8 AS d "
            "UNION ALL SELECT 1.0 FROM generate_series(1, 25)) x"
        )
    finally:
        await conn.close()
    assert a.p50 == pytest.approx(expected["p50"]) and a.p99 == pytest.approx(expected["p99"])
    b = stats["b"]
    assert b.counts["retrying"] == 1 and b.failure_rate is None and b.p50 is None
    # created_at is the run's start (at - duration): the s* rows all started at T0 - 1 s
    later = await store.stats(since=T0 + timedelta(seconds=5))
    assert {s.job: s.total for s in later} == {"a": 19}


async def test_retention_deletes_old_rows_only(store: HistoryStore) -> None:
    now = datetime.now(UTC)
    old = JobEvent.model_validate(
        {
            "job_id": "old",
            "job": "x",
            "queue": "q",
            "state": "succeeded",
            "attempt": 1,
            "at": now - timedelta(days=31),
            "result": None,
        }
    )
    new = JobEvent.model_validate(
        {
            "job_id": "new",
            "job": "x",
            "queue": "q",
            "state": "succeeded",
            "attempt": 1,
            "at": now - timedelta(days=29),
            "result": None,
        }
    )
    await store.upsert([old, new])
    assert await store.delete_older_than(30) == 1
    assert await store.get_job("old") is None and await store.get_job("new") is not None


async def test_unreachable_and_unmigrated_are_one_clear_error(history_url: str) -> None:
    store = HistoryStore(history_url)
    try:
        with pytest.raises(HistoryUnavailable, match="history migrate"):
            await store.list_jobs()
    finally:
        await store.close()
    gone = HistoryStore("postgresql://postgres:secret@127.0.0.1:1/x", connect_timeout=1)
    try:
        with pytest.raises(HistoryUnavailable) as info:
            await gone.stats()
        assert "secret" not in str(info.value)
    finally:
        await gone.close()


@pytest.mark.slow
async def test_listing_over_a_million_rows_is_fast(store: HistoryStore) -> None:
    conn = await asyncpg.connect(store._url)
    try:
        started = time.monotonic()
        # Loaded without the secondary indexes, which are built afterwards (faster than
        # maintaining them row by row); their definitions are the migration's own.
        indexes = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'leveret_jobs' "
            "AND indexname <> 'leveret_jobs_pkey'"
        )
        for index in indexes:
            await conn.execute(f"DROP INDEX {index['indexname']}")
        await conn.execute("SET maintenance_work_mem = '256MB'")
        await conn.execute(
            """
            INSERT INTO leveret_jobs (id, job, queue, state, attempts, created_at, started_at,
                                      ended_at, duration_s, updated_at)
            SELECT 'id' || i, 'job' || (i % 20), 'q' || (i % 5),
                   (ARRAY['succeeded','succeeded','succeeded','dead','retrying'])[1 + i % 5],
                   1 + i % 3, t, t, t + interval '1 second', 1.0, t + interval '1 second'
            FROM generate_series(1, 1000000) AS i,
                 LATERAL (SELECT now() - (i * interval '2 second') AS t) AS x
            """
        )
        for index in indexes:
            await conn.execute(index["indexdef"])
        await conn.execute("VACUUM ANALYZE leveret_jobs")
        print(f"\n1,000,000 rows generated in {time.monotonic() - started:.1f} s")
    finally:
        await conn.close()
    await store.list_jobs(limit=50)  # warm the pool and the plan
    timings: dict[str, float] = {}
    cases: dict[str, dict[str, Any]] = {
        "newest": {},
        "state=dead": {"state": "dead"},
        "job=job7": {"job": "job7"},
        "job+state+since": {
            "job": "job3",
            "state": "dead",
            "since": datetime.now(UTC) - timedelta(days=10),
        },
        "queue=q2": {"queue": "q2"},
        "job+state": {"job": "job8", "state": "dead"},
    }
    for name, filters in cases.items():
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            rows, cursor = await store.list_jobs(limit=50, **filters)
            # the 20th page via the cursor chain
            for _ in range(19):
                rows, cursor = await store.list_jobs(limit=50, cursor=cursor, **filters)
            best = min(best, (time.perf_counter() - started) / 20)
        timings[name] = best * 1000
        assert rows
    stats_started = time.perf_counter()
    await store.stats(since=datetime.now(UTC) - timedelta(hours=1))
    stats_ms = (time.perf_counter() - stats_started) * 1000
    print(
        "listing ms per page over 1M rows:",
        {k: round(v, 2) for k, v in timings.items()},
        f"stats(1h) {stats_ms:.1f} ms",
    )
    assert max(timings.values()) < 50, timings
