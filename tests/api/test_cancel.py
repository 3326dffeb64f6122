"""Cancellation: the request against the status store (404/409/202 at the store level and over
HTTP), the durable mark, the broadcast a running worker hears at once, the marks a worker
started later loads, and what the hot-path check costs."""

from __future__ import annotations

import time
import timeit
from datetime import UTC, datetime

import aio_pika
import pytest
from prometheus_client import CollectorRegistry

from leveret.consumer.features.cancel_watch import CancelWatch
from leveret.producers.stores.cancel import (
    JobAlreadyEnded,
    MemoryCancelMarks,
    RedisCancelMarks,
    UnknownJob,
    request_cancel,
)
from leveret.producers.stores.status import MemoryStatusStore
from leveret.producers.wire.events import JobEvent
from tests.support import Broker, wait_for

from .conftest import SHARED_REDIS, RedisParts, build, serve, wait_connected

EMAIL = {"to": "a@b.c", "subject": "hi"}


def _event(job_id: str, state: str, attempt: int = 1) -> JobEvent:
    return JobEvent(job_id=job_id, job="send_email", queue="api_email", state=state,  # type: ignore[arg-type]
                    attempt=attempt, at=datetime.now(UTC))  # fmt: skip


async def test_request_cancel_at_the_store_level() -> None:
    store, marks = MemoryStatusStore(), MemoryCancelMarks()
    heard: list[str] = []

    async def broadcast(job_id: str) -> None:
        heard.append(job_id)

    with pytest.raises(UnknownJob):
        await request_cancel(store, marks, "nope", broadcast)
    await store.set_queued("q", "send_email", "api_email")
    status = await request_cancel(store, marks, "q", broadcast)
    assert status.state == "queued"
    assert heard == ["q"]
    assert [j async for j in marks.pending()] == ["q"]
    for state in ("succeeded", "dead", "cancelled"):
        job_id = f"ended-{state}"
        await store.set_queued(job_id, "send_email", "api_email")
        await store.apply(_event(job_id, state))
        with pytest.raises(JobAlreadyEnded) as info:
            await request_cancel(store, marks, job_id, broadcast)
        assert info.value.status.state == state
    assert heard == ["q"], "nothing is broadcast for an ended job"


async def test_a_failing_broadcast_still_marks() -> None:
    store, marks = MemoryStatusStore(), MemoryCancelMarks()
    await store.set_queued("q", "send_email", "api_email")

    async def broken(job_id: str) -> None:
        raise ConnectionError("down")

    await request_cancel(store, marks, "q", broken)
    assert [j async for j in marks.pending()] == ["q"]


async def test_delete_over_http_202_404_409_and_the_running_worker_hears_it(
    broker: Broker, redis_parts: RedisParts
) -> None:
    app = build(broker, redis_parts, CollectorRegistry())
    store = redis_parts.test_store()
    marks = RedisCancelMarks.from_url(SHARED_REDIS, ttl=3600, prefix=redis_parts.prefix + "cancel:")
    connection = await aio_pika.connect_robust(broker.url)
    heard: list[str] = []
    try:
        with serve(app) as served:
            wait_connected(served)
            # A worker-side watch, running before the cancel: it hears the broadcast.
            watch = CancelWatch(connection, marks, on_cancel=heard.append)
            await watch.start()
            with served.client() as client:
                assert client.delete("/jobs/unknown-id").status_code == 404
                job_id = client.post("/jobs/send_email", json=EMAIL).json()["id"]
                response = client.delete(f"/jobs/{job_id}")
                assert response.status_code == 202, response.text
                assert response.json() == {"id": job_id, "state": "queued"}
                await wait_for(lambda: job_id in watch, 5, "the broadcast to reach the watch")
                assert heard == [job_id]
                # The mark is durable, for LEVERET_STATUS_TTL.
                assert await marks.client.get(marks.prefix + job_id) == "1"
                assert 0 < await marks.client.ttl(marks.prefix + job_id) <= 3600
                # After it ended (the worker records cancelled): 409.
                await store.apply(_event(job_id, "cancelled", attempt=0))
                ended = client.delete(f"/jobs/{job_id}")
                assert ended.status_code == 409
                assert "cancelled" in ended.json()["detail"]
                other = client.post("/jobs/send_email", json=EMAIL).json()["id"]
                await store.apply(_event(other, "succeeded"))
                assert client.delete(f"/jobs/{other}").status_code == 409
            # A worker started after the cancel still knows: it loads the marks.
            late = CancelWatch(connection, marks)
            await late.start()
            assert job_id in late
            assert other not in late
            await late.stop()
            await watch.stop()
    finally:
        await connection.close()
        await store.close()
        await marks.close()


def test_the_watch_is_bounded_and_forgets_after_the_ttl() -> None:
    marks = MemoryCancelMarks()
    watch = CancelWatch(None, marks, ttl=0.2, max_ids=3)  # type: ignore[arg-type]
    for n in range(5):
        watch.add(f"j{n}")
    assert len(watch) == 3
    assert "j0" not in watch and "j4" in watch
    assert watch.dropped == 2
    time.sleep(0.25)
    watch.add("fresh")  # arrivals drop what is older than the TTL
    assert len(watch) == 1 and "fresh" in watch
    assert watch.dropped == 2, "expired entries are not counted as dropped"


def test_the_hot_path_check_costs_nanoseconds() -> None:
    """``job_id in watch.ids`` is what the worker's hot path does (one dict lookup). Measured
    with no cancel pending and with 10 000 pending; printed, and bounded loosely (a shared,
    loaded 2-core machine) at 1 µs, an order of magnitude under a job's cheapest step."""
    empty = CancelWatch(None, MemoryCancelMarks())  # type: ignore[arg-type]
    full = CancelWatch(None, MemoryCancelMarks(), max_ids=20_000)  # type: ignore[arg-type]
    for n in range(10_000):
        full.add(f"cancelled-{n}")
    job_id = "3f2b8a0e-5d6c-4b7a-9e1f-0a2b3c4d5e6f"
    results = {}
    for name, watch in (("empty", empty), ("10k", full)):
        env = {"ids": watch.ids, "job_id": job_id}
        runs = 1_000_000
        best = min(timeit.repeat("job_id in ids", number=runs, repeat=5, globals=env))
        empty_loop = min(timeit.repeat("pass", number=runs, repeat=5))
        results[name] = max(0.0, (best - empty_loop) / runs * 1e9)
    print(f"cancel check: {results['empty']:.1f} ns empty, {results['10k']:.1f} ns with 10k ids")
    assert results["empty"] < 1000 and results["10k"] < 1000


async def test_delete_without_the_broker_still_marks(broker: Broker) -> None:
    """Broker down (or not yet connected): the mark is what counts; DELETE still answers 202."""
    store, marks = MemoryStatusStore(), MemoryCancelMarks()
    app = build(broker, None, CollectorRegistry(), status_store=store, cancel_marks=marks)
    with serve(app) as served:
        wait_connected(served)
        served.state.cancel_channel = None  # as if the broker had dropped: the broadcast fails
        await store.set_queued("job-x", "send_email", "api_email")
        with served.client() as client:
            assert client.delete("/jobs/job-x").status_code == 202
        assert [j async for j in marks.pending()] == ["job-x"]
