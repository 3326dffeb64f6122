"""A job's status and outcome event land only with the copies that make them true (contract v3).

On the real broker and Redis: a follow-up the broker refuses, a DLQ that refuses the dead copy,
a job replayed from the DLQ that is live again, an API job's queue from the first write.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from leveret.consumer import JobContext, Reject, Worker
from leveret.consumer.ops.dlq import DeadLetters
from leveret.producers import Publisher
from leveret.producers.settings import ConnectionSettings
from leveret.producers.stores.status import DEFAULT_PREFIX, RedisStatusStore
from leveret.topology.model import dlq_name
from tests.support import Broker, assert_queue_types, running, unique, wait_for

from .test_worker_events import Listener, listener  # noqa: F401 - the fixture

STATUS_URL = "redis://127.0.0.1:6379/13"


@pytest.fixture
def job_ids() -> Any:
    ids: list[str] = []
    yield ids
    client = redis.Redis.from_url(STATUS_URL)
    if ids:
        client.delete(*(DEFAULT_PREFIX + i for i in ids))
    client.close()


@pytest.fixture
async def exchange(broker: Broker) -> str:
    return unique("ex")


def publisher(broker: Broker, exchange: str) -> Publisher:
    return Publisher(
        settings=ConnectionSettings(amqp_url=broker.url, exchange=exchange),
        status_url=STATUS_URL,
    )


async def test_a_refused_follow_up_leaves_no_succeeded_status_or_event(
    broker: Broker,
    exchange: str,
    listener: Listener,  # noqa: F811
    registry: CollectorRegistry,
    job_ids: list[str],
) -> None:
    """``ctx.enqueue`` of a job no queue serves: the follow-up is returned (unroutable), so the
    run did not succeed as far as the queues know: no ``succeeded`` status, no event."""
    queue = unique("q")
    settings = broker.settings(exchange=exchange, status_url=STATUS_URL, events="outcomes")
    worker = Worker(settings, registry=registry)
    runs: list[int] = []

    @worker.job(f"{queue}-parent", queue=queue, max_attempts=1)
    async def parent(payload: dict[str, Any], ctx: JobContext) -> str:
        runs.append(ctx.attempt)
        await ctx.enqueue("nobody-serves-this", {})
        return "done"

    async with running(worker), publisher(broker, exchange) as pub:
        job_id = await pub.publish(f"{queue}-parent", {})
        job_ids.append(job_id)
        await wait_for(lambda: len(runs) >= 2, 20, "the job to be given back and run again")
        status = await pub.status(job_id)
        assert status is not None and status.state != "succeeded", status
        assert "succeeded" not in listener.states(job_id)


async def test_a_refused_dlq_copy_leaves_no_dead_status_or_event(
    broker: Broker,
    exchange: str,
    listener: Listener,  # noqa: F811
    registry: CollectorRegistry,
    job_ids: list[str],
) -> None:
    """The DLQ deleted under a running worker: the dead copy is returned, the job is live (it
    is given back), so neither the status nor an event may say ``dead``."""
    queue = unique("q")
    settings = broker.settings(exchange=exchange, status_url=STATUS_URL, events="outcomes")
    worker = Worker(settings, registry=registry)
    runs: list[int] = []

    @worker.job(f"{queue}-job", queue=queue, max_attempts=1)
    async def job(payload: dict[str, Any], ctx: JobContext) -> None:
        runs.append(ctx.attempt)
        raise Reject("no")

    async with running(worker), publisher(broker, exchange) as pub:
        await wait_for(lambda: broker.queue_exists(dlq_name(queue)), 10, "the DLQ")
        broker.api("DELETE", f"/queues/{broker.qvhost}/{dlq_name(queue)}")
        job_id = await pub.publish(f"{queue}-job", {})
        job_ids.append(job_id)
        await wait_for(lambda: len(runs) >= 2, 20, "the job to be given back and run again")
        status = await pub.status(job_id)
        assert status is not None and status.state != "dead", status
        assert "dead" not in listener.states(job_id)


async def test_a_replayed_job_reads_queued_and_can_be_cancelled(
    broker: Broker,
    exchange: str,
    registry: CollectorRegistry,
    job_ids: list[str],
    queue_type: str,
) -> None:
    """Replay revives: ``queued`` with attempts reset, so ``cancel`` takes it (the API's
    ``DELETE`` answers 202 through the same ``request_cancel``) and a worker then acks it
    as ``cancelled`` without running it."""
    queue = unique("q")
    settings = broker.settings(exchange=exchange, status_url=STATUS_URL)
    runs: list[str] = []

    def app() -> Worker:
        worker = Worker(settings, registry=CollectorRegistry())

        @worker.job(f"{queue}-job", queue=queue, max_attempts=1)
        async def job(payload: dict[str, Any], ctx: JobContext) -> None:
            runs.append(ctx.job_id)
            raise Reject("not now")

        return worker

    async with publisher(broker, exchange) as pub:
        async with running(app()):
            job_id = await pub.publish(f"{queue}-job", {})
            job_ids.append(job_id)
            await wait_for(lambda: _state(pub, job_id, "dead"), 10, "the job to die")
            assert_queue_types(broker, queue, queue_type)
        store = RedisStatusStore.from_url(STATUS_URL)
        try:
            async with DeadLetters(
                ConnectionSettings(amqp_url=broker.url, exchange=exchange),
                queue,
                status_store=store,
            ) as dlq:
                assert await dlq.replay() == 1
        finally:
            await store.close()
        revived = await pub.status(job_id)
        assert revived is not None
        assert (revived.state, revived.attempt, revived.ended_at) == ("queued", 0, None)
        assert revived.created_at is not None  # kept from its first life
        cancelled = await pub.cancel(job_id)  # JobAlreadyEnded (409) before the fix
        assert cancelled.state == "queued"
        async with running(app()):
            await wait_for(lambda: _state(pub, job_id, "cancelled"), 10, "cancelled")
    assert runs == [job_id]  # ran once, before the replay


async def _state(pub: Publisher, job_id: str, wanted: str) -> bool:
    status = await pub.status(job_id)
    return status is not None and status.state == wanted


async def test_a_dedup_key_is_free_once_the_job_ends_without_any_events(
    broker: Broker,
    exchange: str,
    registry: CollectorRegistry,
    job_ids: list[str],
    queue_type: str,
) -> None:
    """``LEVERET_EVENTS=off`` (the default) with a status store: statuses end and the ending
    write frees the dedup key (the keeper that did it before needed events)."""
    queue = unique("q")
    worker = Worker(broker.settings(exchange=exchange, status_url=STATUS_URL), registry=registry)
    assert worker.settings.events_mode == "off"

    @worker.job(f"{queue}-job", queue=queue)
    async def job(payload: dict[str, Any]) -> int:
        return 1

    key = unique("key")
    async with running(worker), publisher(broker, exchange) as pub:
        assert_queue_types(broker, queue, queue_type)
        first = await pub.publish(f"{queue}-job", {}, dedup_key=key)
        job_ids.append(first)
        assert await pub.result(first, timeout=10) == 1
        second = await pub.publish(f"{queue}-job", {}, dedup_key=key)
        job_ids.append(second)
        assert second != first
        assert await pub.result(second, timeout=10) == 1
    await asyncio.sleep(0)


async def test_ctx_enqueue_is_awaited_and_takes_a_dedup_key(
    broker: Broker, exchange: str, registry: CollectorRegistry, job_ids: list[str]
) -> None:
    """``await ctx.enqueue(..., dedup_key=K)``: a second parent enqueueing K while the first
    child is live gets the first child's id and enqueues nothing; a failed run frees its
    claim at once (its follow-up is never published)."""
    queue, idle = unique("q"), unique("idle")
    worker = Worker(broker.settings(exchange=exchange, status_url=STATUS_URL), registry=registry)
    got: dict[str, str] = {}

    @worker.job(f"{queue}-parent", queue=queue, max_attempts=1)
    async def parent(payload: dict[str, Any], ctx: JobContext) -> None:
        got[ctx.job_id] = await ctx.enqueue(f"{idle}-child", {}, dedup_key=payload["key"])
        if payload.get("fail"):
            raise Reject("after enqueueing")

    @worker.job(f"{idle}-child", queue=idle)
    async def child(payload: dict[str, Any]) -> None:
        pass

    key, freed = unique("key"), unique("key")
    async with running(worker, queues=[queue]), publisher(broker, exchange) as pub:
        a = await pub.publish(f"{queue}-parent", {"key": key})
        b = await pub.publish(f"{queue}-parent", {"key": key})
        failing = await pub.publish(f"{queue}-parent", {"key": freed, "fail": True})
        job_ids.extend([a, b, failing])
        for parent_id in (a, b, failing):
            await wait_for(lambda p=parent_id: _ended(pub, p), 10, "the parents to end")
        job_ids.extend(got.values())
        assert got[a] == got[b]  # the live child's id, once
        await wait_for(lambda: broker.queue(idle).get("messages", 0) == 1, 15, "one child")
        child_status = await pub.status(got[a])
        assert child_status is not None and child_status.state == "queued"
        # The failed parent's claim is free: a publish with that key enqueues a new job.
        again = await pub.publish(f"{idle}-child", {}, dedup_key=freed)
        job_ids.append(again)
        assert again != got[failing]


async def _ended(pub: Publisher, job_id: str) -> bool:
    status = await pub.status(job_id)
    return status is not None and status.ended
