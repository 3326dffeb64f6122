"""Status store semantics, on Redis and on the in-memory store alike (the ``store`` fixture).

The ordering rule is checked case by case, then on every order of a whole job history: a status
never moves backwards, and the Redis script and the Python rule agree after every single event.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from leveret.producers.stores.status import (
    JobCancelled,
    JobFailed,
    JobStatus,
    MemoryStatusStore,
    RedisStatusStore,
    StatusStore,
    StatusStoreError,
    StatusStoreUnavailable,
    wait_result,
)
from leveret.producers.wire.events import JobEvent, build_event, parse_event
from leveret.topology.errors import LeveretError

from .conftest import PrivateRedis, shared_redis_store

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def ev(
    state: str, attempt: int, seconds: float = 0, job_id: str = "job-1", **extra: Any
) -> JobEvent:
    return parse_event(
        build_event(
            job_id=job_id,
            job="resize",
            queue="images",
            state=state,  # type: ignore[arg-type]
            attempt=attempt,
            at=T0 + timedelta(seconds=seconds),
            **extra,
        )
    )


async def state_of(store: StatusStore, job_id: str = "job-1") -> tuple[str, int] | None:
    status = await store.get(job_id)
    return None if status is None else (status.state, status.attempt)


async def test_unknown_id(store: StatusStore) -> None:
    assert await store.get("nope") is None
    assert await store.ttl_remaining("nope") is None


async def test_a_normal_life(store: StatusStore) -> None:
    assert await store.set_queued("job-1", "resize", "images", at=T0)
    queued = await store.get("job-1")
    assert queued is not None
    assert queued.model_dump(mode="json") == {
        "id": "job-1",
        "job": "resize",
        "queue": "images",
        "state": "queued",
        "attempt": 0,
        "result": None,
        "error": None,
        "progress": None,
        "message": None,
        "updated_at": "2026-03-01T12:00:00.000Z",
        "created_at": "2026-03-01T12:00:00.000Z",
        "started_at": None,
        "ended_at": None,
    }
    assert await store.apply(ev("started", 1, 1))
    assert await store.apply(ev("progress", 1, 2, progress=0.4, message="4 of 10"))
    status = await store.get("job-1")
    assert status is not None
    assert (status.state, status.progress, status.message) == ("started", 0.4, "4 of 10")
    assert await store.apply(ev("retrying", 1, 3, duration_s=2.0, error="OSError: disk"))
    status = await store.get("job-1")
    assert status is not None
    assert (status.state, status.attempt, status.error) == ("retrying", 1, "OSError: disk")
    assert await store.apply(ev("started", 2, 10))
    status = await store.get("job-1")
    assert status is not None
    # A new run starts with no progress and no error of the previous one.
    assert (status.progress, status.message, status.error) == (None, None, None)
    assert await store.apply(ev("progress", 2, 11, progress=1.0, message="done"))
    result = {"sizes": [1, 2.5, "x", None, [], {}], "big": 12345678901234567890, "ü": True}
    assert await store.apply(ev("succeeded", 2, 12, duration_s=2.0, result=result))
    final = await store.get("job-1")
    assert final is not None
    assert final.model_dump(mode="json") == {
        "id": "job-1",
        "job": "resize",
        "queue": "images",
        "state": "succeeded",
        "attempt": 2,
        "result": result,  # JSON survives the store untouched: empty list/object, big int
        "error": None,
        "progress": 1.0,  # the run's last progress report stays visible
        "message": "done",
        "updated_at": "2026-03-01T12:00:12.000Z",
        "created_at": "2026-03-01T12:00:00.000Z",  # kept from the first write
        "started_at": "2026-03-01T12:00:10.000Z",  # the last run's start (12 s - 2 s)
        "ended_at": "2026-03-01T12:00:12.000Z",
    }


async def test_late_events_never_regress(store: StatusStore) -> None:
    await store.apply(ev("succeeded", 1, 5, result=3))
    for late in (
        ev("started", 1, 1),
        ev("progress", 1, 2, progress=0.5),
        ev("retrying", 1, 3, error="x"),
        ev("started", 2, 6),  # a terminal status is final, whatever the attempt
        ev("dead", 1, 7, error="late"),  # the first ending wins
    ):
        assert not await store.apply(late), late.state
    assert not await store.set_queued("job-1", "resize", "images")
    status = await store.get("job-1")
    assert status is not None
    assert (status.state, status.attempt, status.result, status.error) == ("succeeded", 1, 3, None)


async def test_order_within_and_across_attempts(store: StatusStore) -> None:
    assert await store.apply(ev("retrying", 1, 3, error="e1"))
    assert not await store.apply(ev("started", 1, 1))  # same attempt, lower rank
    assert not await store.apply(ev("retrying", 1, 3, error="e1"))  # duplicate
    assert await store.apply(ev("retrying", 2, 8, error="e2"))  # a later attempt moves on
    assert not await store.apply(ev("started", 2, 6))
    assert not await store.apply(ev("retrying", 1, 3))
    assert await state_of(store) == ("retrying", 2)
    assert await store.apply(ev("started", 3, 9))
    assert await state_of(store) == ("started", 3)


async def test_an_ending_wins_over_any_attempt(store: StatusStore) -> None:
    # Cancelled while waiting for a retry: no handler ran for this delivery (attempt 0).
    await store.apply(ev("retrying", 2, 3, error="e"))
    assert await store.apply(ev("cancelled", 0, 4))
    assert await state_of(store) == ("cancelled", 0)
    with pytest.raises(JobCancelled):
        await wait_result(store, "job-1", timeout=1)


async def test_queued_never_overwrites(store: StatusStore) -> None:
    assert await store.apply(ev("started", 1, 1))  # the worker was faster than the publisher
    assert not await store.set_queued("job-1", "resize", "images")
    assert await state_of(store) == ("started", 1)
    assert await store.set_queued("job-2", "resize", "images")
    assert not await store.set_queued("job-2", "resize", "images")


async def test_progress_rules(store: StatusStore) -> None:
    # Arriving before its `started`, a progress report proves the run started.
    assert await store.apply(ev("progress", 1, 2, progress=0.2, message="a"))
    assert await state_of(store) == ("started", 1)
    assert not await store.apply(ev("started", 1, 1))  # the late `started` changes nothing
    status = await store.get("job-1")
    assert status is not None and status.progress == 0.2
    # An older report does not overwrite a newer one; a newer one replaces both fields.
    assert not await store.apply(ev("progress", 1, 1.5, progress=0.1, message="old"))
    assert await store.apply(ev("progress", 1, 3, progress=0.6))
    status = await store.get("job-1")
    assert status is not None
    assert (status.progress, status.message) == (0.6, None)
    # Progress of an earlier run is ignored; it does not touch a retrying status either.
    assert await store.apply(ev("retrying", 1, 4, error="e"))
    assert not await store.apply(ev("progress", 1, 5, progress=0.9))
    status = await store.get("job-1")
    assert status is not None
    assert (status.state, status.progress, status.error) == ("retrying", 0.6, "e")
    assert await store.apply(ev("succeeded", 2, 9))
    assert not await store.apply(ev("progress", 2, 10, progress=0.99))
    status = await store.get("job-1")
    assert status is not None and status.state == "succeeded" and status.progress is None


async def test_ttl_is_set_and_refreshed() -> None:
    for store in (MemoryStatusStore(ttl=120),):
        await _check_ttl(store)
    async with shared_redis_store(ttl=120) as redis_store:
        await _check_ttl(redis_store)
        assert 115 <= await redis_store.client.ttl(redis_store.key("job-1")) <= 120


async def _check_ttl(store: StatusStore) -> None:
    await store.set_queued("job-1", "resize", "images")
    remaining = await store.ttl_remaining("job-1")
    assert remaining is not None and 115 < remaining <= 120
    await asyncio.sleep(1.1)
    await store.apply(ev("started", 1, 1))
    refreshed = await store.ttl_remaining("job-1")
    assert refreshed is not None and refreshed > remaining - 0.5


async def test_status_expires() -> None:
    memory = MemoryStatusStore(ttl=1)
    async with shared_redis_store(ttl=1) as redis_store:
        for store in (memory, redis_store):
            await store.apply(ev("started", 1, 1))
            assert await store.get("job-1") is not None
        await asyncio.sleep(1.3)
        for store in (memory, redis_store):
            assert await store.get("job-1") is None


async def test_wait_result(store: StatusStore) -> None:
    async def finish_later() -> None:
        await asyncio.sleep(0.3)
        await store.apply(ev("succeeded", 1, 2, result={"ok": True}))

    await store.set_queued("job-1", "resize", "images")
    task = asyncio.create_task(finish_later())
    started = time.monotonic()
    assert await wait_result(store, "job-1", timeout=5) == {"ok": True}
    assert time.monotonic() - started < 1
    await task

    await store.apply(ev("dead", 3, 2, job_id="job-2", error="ValueError: bad input"))
    with pytest.raises(JobFailed, match="ValueError: bad input") as failed:
        await wait_result(store, "job-2", timeout=1)
    assert isinstance(failed.value, LeveretError)
    assert failed.value.error == "ValueError: bad input" and failed.value.status.attempt == 3

    await store.apply(ev("cancelled", 0, 2, job_id="job-3"))
    with pytest.raises(JobCancelled) as cancelled:
        await wait_result(store, "job-3", timeout=1)
    assert isinstance(cancelled.value, LeveretError)

    await store.apply(ev("started", 1, 2, job_id="job-4"))
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="status is started"):
        await wait_result(store, "job-4", timeout=0.3)
    assert 0.25 < time.monotonic() - started < 1
    with pytest.raises(TimeoutError, match="status is unknown"):
        await wait_result(store, "never-published", timeout=0.2)


# --- every order of a whole history -----------------------------------------------------------

HISTORY = [
    ev("started", 1, 1),
    ev("progress", 1, 2, progress=0.3, message="a"),
    ev("retrying", 1, 3, duration_s=2.0, error="boom"),
    ev("started", 2, 10),
    ev("progress", 2, 11, progress=0.5),
    ev("progress", 2, 12, progress=0.7, message="b"),
    ev("succeeded", 2, 13, duration_s=3.0, result={"n": [1, 2]}),
]


def _position(status: JobStatus | None) -> tuple[int, int, int]:
    """How far along a status is; it must never decrease."""
    if status is None:
        return (0, -1, 0)
    rank = {"queued": 0, "started": 1, "retrying": 2}
    if status.ended:
        return (1, 0, 0)
    return (0, status.attempt, rank[status.state])


async def _replay(stores: list[StatusStore], order: list[int], queued_at: int) -> None:
    positions = [_position(None)] * len(stores)
    for step, index in enumerate(order):
        if step == queued_at:
            for store in stores:
                await store.set_queued("job-1", "resize", "images", at=T0)
        statuses = []
        for store in stores:
            await store.apply(HISTORY[index])
            statuses.append(await store.get("job-1"))
        # Redis and the Python rule agree after every event.
        assert all(s == statuses[0] for s in statuses), (order, step)
        new = [_position(s) for s in statuses]
        assert all(n >= p for n, p in zip(new, positions, strict=True)), (order, step)
        positions = new
    final = statuses[0]
    assert final is not None
    assert (final.state, final.attempt, final.result, final.error) == (
        "succeeded",
        2,
        {"n": [1, 2]},
        None,
    )


async def test_every_order_on_memory() -> None:
    for order in itertools.permutations(range(len(HISTORY))):
        await _replay([MemoryStatusStore()], list(order), queued_at=0)


async def test_shuffled_histories_agree_between_redis_and_memory() -> None:
    rng = random.Random(12)
    orders = [list(range(len(HISTORY)))] + [
        rng.sample(range(len(HISTORY)), len(HISTORY)) for _ in range(150)
    ]
    for order in orders:
        async with shared_redis_store() as redis_store:
            await _replay([MemoryStatusStore(), redis_store], order, rng.randrange(len(HISTORY)))


async def test_concurrent_writers_on_redis() -> None:
    """Many writers at once (several keepers) still end at the furthest state."""
    async with shared_redis_store() as redis_store:
        others = [
            RedisStatusStore.from_url(
                "redis://127.0.0.1:6379/0", prefix=redis_store.prefix, ttl=redis_store.ttl
            )
            for _ in range(4)
        ]
        try:
            for job in range(20):
                job_id = f"job-{job}"
                events = [e.model_copy(update={"job_id": job_id}) for e in HISTORY] * 3
                random.Random(job).shuffle(events)
                await asyncio.gather(
                    *(others[i % 4].apply(e) for i, e in enumerate(events)),
                    others[0].set_queued(job_id, "resize", "images"),
                )
                assert await state_of(redis_store, job_id) == ("succeeded", 2)
        finally:
            for other in others:
                await other.close()


# --- failures ---------------------------------------------------------------------------------


async def test_redis_down_is_a_clear_unavailable_error(private_redis: PrivateRedis) -> None:
    store = RedisStatusStore.from_url(
        private_redis.url.replace("redis://", "redis://:s3cret@"), timeout=1
    )
    private_redis.stop()
    try:
        started = time.monotonic()
        for call in (store.get("x"), store.apply(ev("started", 1)), store.ping()):
            with pytest.raises(StatusStoreUnavailable) as info:
                await call
            assert isinstance(info.value, LeveretError) and isinstance(info.value, ConnectionError)
            assert "s3cret" not in str(info.value) and "******" in str(info.value)
        assert time.monotonic() - started < 5  # fails fast, does not hang the caller
    finally:
        await store.close()


async def test_a_foreign_value_under_the_prefix_is_a_permanent_error() -> None:
    async with shared_redis_store() as redis_store:
        await redis_store.client.set(redis_store.key("job-1"), "not a hash")
        with pytest.raises(StatusStoreError) as info:
            await redis_store.apply(ev("started", 1))
        assert not isinstance(info.value, StatusStoreUnavailable)


async def test_memory_store_can_act_out_an_outage() -> None:
    store = MemoryStatusStore()
    store.available = False
    with pytest.raises(StatusStoreUnavailable):
        await store.apply(ev("started", 1))
    store.available = True
    assert await store.apply(ev("started", 1))
