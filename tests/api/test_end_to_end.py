"""Issue 13 end to end: the API served by uvicorn, a real worker (events → status keeper →
Redis), the real broker. Cancellation before, during and after a run; in the retry chain; on a
worker started after the cancel; a dedup key freed when its job ends; the hot-path cost.

Redis: database 13 of the shared server with the default prefixes (as the worker uses them);
every key a test made is deleted afterwards, by id.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from leveret.consumer import JobContext, Worker
from leveret.consumer.api import ApiSettings, create_app
from leveret.producers import Publisher
from leveret.producers.settings import ConnectionSettings
from leveret.producers.stores.cancel import JobAlreadyEnded
from leveret.producers.stores.settings import LifecycleSettings
from leveret.producers.stores.status import RedisStatusStore
from tests.support import Broker, assert_queue_types, running, unique, wait_for

from .conftest import TOKEN, serve, wait_connected

STATUS_URL = "redis://127.0.0.1:6379/13"


class Order(BaseModel):
    n: int


class App:
    """One worker app per test, on an exchange of its own (its own cancel fanout and events)."""

    def __init__(self, broker: Broker) -> None:
        self.exchange, self.queue = unique("ex13"), unique("q13")
        self.settings = broker.settings(
            exchange=self.exchange, status_url=STATUS_URL, shutdown_grace=5
        )
        self.ran: list[tuple[str, int]] = []
        self.saw_cancel: list[str] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        worker = Worker(self.settings, registry=CollectorRegistry())

        @worker.job("charge", queue=self.queue, max_attempts=1)
        async def charge(order: Order, ctx: JobContext) -> dict[str, int]:
            self.ran.append((ctx.job_id, ctx.attempt))
            return {"charged": order.n}

        @worker.job("long", queue=self.queue, max_attempts=1, cancellable=True)
        async def long(order: Order, ctx: JobContext) -> None:
            self.ran.append((ctx.job_id, ctx.attempt))
            self.started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.saw_cancel.append(ctx.job_id)
                raise

        @worker.job("stubborn", queue=self.queue, max_attempts=3, backoff=0)
        async def stubborn(order: Order, ctx: JobContext) -> None:
            """Not cancellable: runs to its end, then would be retried."""
            self.ran.append((ctx.job_id, ctx.attempt))
            self.started.set()
            await self.release.wait()
            raise RuntimeError("fails, would retry")

        @worker.job("flaky", queue=self.queue, max_attempts=3, backoff=4)
        async def flaky(order: Order, ctx: JobContext) -> None:
            self.ran.append((ctx.job_id, ctx.attempt))
            raise RuntimeError("fails; the retry waits 4 s in the delay chain")

        self.worker = worker

    def fresh_worker(self) -> Worker:
        """A second worker process's view of the same app (a worker started later)."""
        old = self.worker
        worker = Worker(self.settings, registry=CollectorRegistry())
        for spec in old.jobs.jobs.values():
            worker.jobs.jobs[spec.name] = spec
        return worker

    def completed(self, worker: Worker, job: str, outcome: str) -> float:
        value = worker.metrics.registry.get_sample_value(
            "leveret_jobs_completed_total",
            {"queue": self.queue, "job_name": job, "outcome": outcome},
        )
        return value or 0.0


@pytest.fixture
async def store() -> AsyncIterator[RedisStatusStore]:
    s = RedisStatusStore.from_url(STATUS_URL)
    yield s
    await s.close()


@pytest.fixture
async def cleanup() -> AsyncIterator[list[str]]:
    """Ids and dedup keys a test made; their status, cancel and dedup keys are deleted."""
    made: list[str] = []
    yield made
    client = aioredis.Redis.from_url(STATUS_URL)
    keys = [
        k for i in made for k in (f"leveret:{i}", f"leveret:cancel:{i}", f"leveret:dedup-job:{i}")
    ] + [f"leveret:dedup:{i}" for i in made]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def api(app: App) -> Any:
    """The API's own stores (on its own loop, closed with it), from ``LEVERET_STATUS_URL``."""
    return create_app(
        app.worker,
        ApiSettings(api_token=TOKEN),
        lifecycle=LifecycleSettings(status_url=STATUS_URL),
        registry=CollectorRegistry(),
        metrics_port=0,
    )


async def state_of(store: RedisStatusStore, job_id: str) -> str | None:
    status = await store.get(job_id)
    return None if status is None else status.state


async def http(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """httpx's blocking client off the loop: the worker runs on this loop meanwhile."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def test_get_reads_queued_then_succeeded_with_the_result(
    broker: Broker, store: RedisStatusStore, cleanup: list[str], queue_type: str
) -> None:
    app = App(broker)
    with serve(api(app)) as served, served.client() as client:
        await asyncio.to_thread(wait_connected, served)
        job_id = (await http(client.post, "/jobs/charge", json={"n": 7})).json()["id"]
        cleanup.append(job_id)
        first = (await http(client.get, f"/jobs/{job_id}")).json()
        assert first["state"] == "queued"
        async with running(app.worker):
            assert_queue_types(broker, app.queue, queue_type)
            await wait_for(lambda: state_of(store, job_id), 10, "a status")

            async def succeeded() -> Any:
                body = (await http(client.get, f"/jobs/{job_id}")).json()
                return body if body["state"] == "succeeded" else None

            body = await wait_for(succeeded, 15, "GET to read succeeded")
        assert body["result"] == {"charged": 7}
        assert body["queue"] == app.queue
        assert app.ran == [(job_id, 1)]


async def test_delete_before_start_never_runs_even_on_a_worker_started_later(
    broker: Broker, store: RedisStatusStore, cleanup: list[str]
) -> None:
    """No worker runs at the DELETE: the mark is what the worker started afterwards honours."""
    app = App(broker)
    with serve(api(app)) as served, served.client() as client:
        await asyncio.to_thread(wait_connected, served)
        job_id = (await http(client.post, "/jobs/charge", json={"n": 1})).json()["id"]
        control = (await http(client.post, "/jobs/charge", json={"n": 2})).json()["id"]
        cleanup += [job_id, control]
        deleted = await http(client.delete, f"/jobs/{job_id}")
        assert deleted.status_code == 202, deleted.text
        assert deleted.json() == {"id": job_id, "state": "queued"}
        async with running(app.worker):
            await wait_for(lambda: _both_ended(store, job_id, control), 15, "both jobs to end")
            assert await state_of(store, job_id) == "cancelled"
            assert await state_of(store, control) == "succeeded"
        assert [r[0] for r in app.ran] == [control]  # the cancelled one never ran
        assert app.completed(app.worker, "charge", "cancelled") == 1
        # A job that ended cannot be cancelled: 409, for cancelled and succeeded alike.
        for ended in (job_id, control):
            again = await http(client.delete, f"/jobs/{ended}")
            assert again.status_code == 409, again.text
        assert (await http(client.delete, "/jobs/no-such-job")).status_code == 404


async def _both_ended(store: RedisStatusStore, *ids: str) -> bool:
    states = [await state_of(store, i) for i in ids]
    return all(state in ("succeeded", "dead", "cancelled") for state in states)


async def test_delete_during_a_cancellable_run_ends_it_cancelled(
    broker: Broker, store: RedisStatusStore, cleanup: list[str], queue_type: str
) -> None:
    app = App(broker)
    with serve(api(app)) as served, served.client() as client:
        await asyncio.to_thread(wait_connected, served)
        async with running(app.worker):
            assert_queue_types(broker, app.queue, queue_type)
            job_id = (await http(client.post, "/jobs/long", json={"n": 1})).json()["id"]
            cleanup.append(job_id)
            await asyncio.wait_for(app.started.wait(), 10)
            await wait_for(lambda: _is(store, job_id, "started"), 10, "the status to read started")
            deleted = await http(client.delete, f"/jobs/{job_id}")
            assert deleted.status_code == 202, deleted.text
            await wait_for(lambda: _is(store, job_id, "cancelled"), 10, "cancelled")
            assert app.saw_cancel == [job_id]  # the handler saw CancelledError
            status = await store.get(job_id)
            assert status is not None and status.attempt == 1
            assert app.completed(app.worker, "long", "cancelled") == 1
            assert app.completed(app.worker, "long", "retried") == 0
        after = await http(client.delete, f"/jobs/{job_id}")
        assert after.status_code == 409
    assert app.ran == [(job_id, 1)]  # ran once, not retried, not given back


async def _is(store: RedisStatusStore, job_id: str, state: str) -> bool:
    return await state_of(store, job_id) == state


def publisher(app: App) -> Publisher:
    return Publisher(
        settings=ConnectionSettings(amqp_url=app.settings.amqp_url, exchange=app.exchange),
        status_url=STATUS_URL,
    )


async def test_a_running_job_not_cancellable_finishes_and_is_not_retried(
    broker: Broker, store: RedisStatusStore, cleanup: list[str]
) -> None:
    app = App(broker)
    async with publisher(app) as pub, running(app.worker):
        job_id = await pub.publish("stubborn", {"n": 1})
        cleanup.append(job_id)
        await asyncio.wait_for(app.started.wait(), 10)
        before = await pub.cancel(job_id)
        assert before.state in ("queued", "started")
        await asyncio.sleep(0.5)  # the broadcast reaches the worker; the run goes on
        assert await state_of(store, job_id) != "cancelled"
        app.release.set()  # the run fails, and would be retried (max_attempts=3, backoff 0)
        await wait_for(lambda: _is(store, job_id, "cancelled"), 10, "cancelled")
        await asyncio.sleep(1)
    assert app.ran == [(job_id, 1)]
    assert app.completed(app.worker, "stubborn", "retried") == 0


async def test_a_job_cancelled_in_the_retry_chain_never_runs_again(
    broker: Broker, store: RedisStatusStore, cleanup: list[str], queue_type: str
) -> None:
    app = App(broker)
    async with publisher(app) as pub, running(app.worker):
        assert_queue_types(broker, app.queue, queue_type)
        job_id = await pub.publish("flaky", {"n": 1})
        cleanup.append(job_id)
        await wait_for(lambda: _is(store, job_id, "retrying"), 10, "the first run to fail")
        await pub.cancel(job_id)  # it waits 4 s in the delay chain meanwhile
        await wait_for(lambda: _is(store, job_id, "cancelled"), 15, "the retry to be refused")
    assert app.ran == [(job_id, 1)]
    with pytest.raises(JobAlreadyEnded):
        async with publisher(app) as pub:
            await pub.cancel(job_id)


async def test_a_dedup_key_is_freed_when_its_job_ends(
    broker: Broker, store: RedisStatusStore, cleanup: list[str], queue_type: str
) -> None:
    app = App(broker)
    key = unique("invoice")
    with serve(api(app)) as served, served.client() as client:
        await asyncio.to_thread(wait_connected, served)
        first = (await http(client.post, f"/jobs/charge?dedup_key={key}", json={"n": 1})).json()
        again = (await http(client.post, f"/jobs/charge?dedup_key={key}", json={"n": 2})).json()
        cleanup += [first["id"], key]
        assert again["id"] == first["id"]  # held: the first job's id, nothing enqueued
        async with publisher(app) as pub:
            assert await pub.publish("charge", {"n": 3}, dedup_key=key) == first["id"]
            async with running(app.worker):
                assert_queue_types(broker, app.queue, queue_type)
                await wait_for(lambda: _is(store, first["id"], "succeeded"), 15, "succeeded")

                async def freed() -> str | None:
                    new = await pub.publish("charge", {"n": 4}, dedup_key=key)
                    return new if new != first["id"] else None

                second = await wait_for(freed, 5, "the key to be freed", interval=0.2)
                cleanup.append(second)
                await wait_for(lambda: _is(store, second, "succeeded"), 15, "the new job")
    assert [r[0] for r in app.ran] == [first["id"], second]  # n=2 and n=3 never enqueued


async def test_without_a_status_store_the_chain_has_no_cancellation_layer(
    broker: Broker,
) -> None:
    """Cancellation lives where its marks do: a worker without ``LEVERET_STATUS_URL`` builds no
    cancellation layer, so its jobs pay nothing for the feature; with one, it has the layer."""
    from prometheus_client import CollectorRegistry

    from leveret.consumer import Worker

    for status_url, expected in ((None, False), ("redis://127.0.0.1:6379/13", True)):
        worker = Worker(broker.settings(status_url=status_url), registry=CollectorRegistry())

        @worker.job("noop", queue=unique("q"))
        async def noop(payload: dict[str, Any]) -> None:
            pass

        async with running(worker):
            assert worker._pipeline is not None
            assert (worker._pipeline.cancellation is not None) is expected
