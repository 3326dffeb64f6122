"""Retry rules, expiry and the Redis lock store on the real broker and Redis (workers run in this
process; tests/coordination/test_processes.py runs real worker processes)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aio_pika
import pytest
import redis
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from leveret import Retry
from leveret.consumer import JobContext, Worker
from leveret.consumer.features.locks import Locked, LockLost, RedisLocks, key_template
from leveret.producers import Publisher
from leveret.producers.settings import ConnectionSettings
from leveret.producers.stores.redis import redis_client
from leveret.topology.model import dlq_name
from tests.support import Broker, running, unique, wait_for

from .conftest import STATUS_URL, job


class Step(BaseModel):
    n: int = 0
    kind: str = ""


async def _declare(broker: Broker, worker: Worker) -> None:
    from leveret.topology.declare import declare

    connection = await aio_pika.connect(broker.url)
    async with connection:
        await declare(connection, worker.topology)


def _dead(broker: Broker, queue: str, count: int) -> list[dict[str, Any]]:
    return broker.get_messages(dlq_name(queue), count)


async def test_redis_locks_exclude_renew_release_and_fence(redis_db: redis.Redis) -> None:
    client = redis_client(STATUS_URL)
    try:
        locks = RedisLocks(client)
        first = await locks.acquire("c1", "a", 5)
        assert first is not None
        assert await locks.acquire("c1", "b", 5) is None
        assert await locks.renew("c1", "a", first, 5)
        assert not await locks.renew("c1", "b", first, 5)  # not b's
        await locks.release("c1", "b", first)  # not b's: nothing happens
        assert await locks.acquire("c1", "b", 5) is None
        await locks.release("c1", "a", first)
        second = await locks.acquire("c1", "b", 0.2)
        assert second is not None and second > first
        await asyncio.sleep(0.3)  # expired: free again, with a higher token
        third = await locks.acquire("c1", "c", 5)
        assert third is not None and third > second
    finally:
        await client.aclose()


async def test_a_long_run_keeps_its_lock_past_the_ttl(redis_db: redis.Redis) -> None:
    client = redis_client(STATUS_URL)
    try:
        locks = RedisLocks(client)
        render = key_template("{n}", "lock", "j", Step)
        layer = Locked("{n}", render, locks, 0.6, max_waiting=1, cancels=True)
        ctx = JobContext("id-2", "j", "q", 1, 3, None, payload=Step(n=8))  # type: ignore[arg-type]
        others: list[int | None] = []

        async def handler(c: JobContext) -> str:
            for _ in range(3):  # 1.5 s, well past the 0.6 s TTL: renewals keep it
                await asyncio.sleep(0.5)
                others.append(await locks.acquire("8", "someone-else", 5))
            return "done"

        assert await layer(ctx, handler) == "done"
        assert others == [None, None, None] and not ctx.lock_lost
        await asyncio.sleep(0.05)  # the release is sent with the next batch
        assert not redis_db.exists("leveret:lock:key:8")
    finally:
        await client.aclose()


async def test_a_lost_lock_tells_ctx_and_cancels_the_async_run(redis_db: redis.Redis) -> None:
    client = redis_client(STATUS_URL)
    try:
        locks = RedisLocks(client)
        render = key_template("{n}", "lock", "j", Step)
        layer = Locked("{n}", render, locks, 0.6, max_waiting=1, cancels=True)
        ctx = JobContext("id-1", "j", "q", 1, 3, None, payload=Step(n=7))  # type: ignore[arg-type]
        seen: list[str] = []

        async def handler(c: JobContext) -> None:
            seen.append("started")
            # Someone removes the key (an operator, a flush, an expiry while Redis stalled).
            redis_db.delete("leveret:lock:key:7")
            await asyncio.sleep(5)
            seen.append("finished")  # never: the run is cancelled within a renewal

        started = time.monotonic()
        with pytest.raises(LockLost):
            await layer(ctx, handler)
        assert ctx.lock_lost and seen == ["started"]
        assert time.monotonic() - started < 1.5
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0  # nothing left pending on us
    finally:
        await client.aclose()


async def test_retry_on_and_retry_after(broker: Broker, redis_db: redis.Redis) -> None:
    exchange, queue = unique("ex"), unique("q")
    worker = Worker(broker.settings(exchange=exchange), registry=CollectorRegistry())
    runs: list[tuple[str, int, float]] = []

    @job(worker, f"{queue}-job", queue=queue, retry_on=(TimeoutError,), max_attempts=3, backoff=60)
    async def handler(step: Step, ctx: JobContext) -> None:
        runs.append((step.kind, ctx.attempt, time.monotonic()))
        if step.kind == "later" and ctx.attempt == 1:
            raise Retry(after=1.5)
        if step.kind == "bug":
            raise ValueError("not retryable")

    async with running(worker):
        settings = ConnectionSettings(amqp_url=broker.url, exchange=exchange)
        async with Publisher(settings=settings) as pub:
            await pub.publish(f"{queue}-job", Step(kind="later"))
            await pub.publish(f"{queue}-job", Step(kind="bug"))
            await wait_for(lambda: len(runs) >= 3, 15, "the retry after 1.5 s")
            await wait_for(lambda: len(_dead(broker, queue, 5)) == 1, 10, "the rejected job")
    later = [t for kind, _, t in runs if kind == "later"]
    assert [a for kind, a, _ in runs if kind == "later"] == [1, 2]
    assert later[1] - later[0] >= 1.5  # not earlier than asked (the backoff says 60 s)
    assert later[1] - later[0] < 1.5 + 1.5
    assert [a for kind, a, _ in runs if kind == "bug"] == [1]  # no retry
    (dead,) = _dead(broker, queue, 5)
    assert dead["properties"]["headers"]["x-reason"] == "rejected"
    assert "ValueError" in dead["properties"]["headers"]["x-error"]


async def test_an_expired_job_ends_dead_and_never_runs(
    broker: Broker, redis_db: redis.Redis
) -> None:
    exchange, queue = unique("ex"), unique("q")
    settings = broker.settings(exchange=exchange, status_url=STATUS_URL)
    worker = Worker(settings, registry=CollectorRegistry())
    ran: list[int] = []

    @worker.job(f"{queue}-job", queue=queue)
    async def handler(step: Step) -> None:
        ran.append(step.n)

    await _declare(broker, worker)
    conn = ConnectionSettings(amqp_url=broker.url, exchange=exchange)
    async with Publisher(settings=conn, status_url=STATUS_URL) as pub:
        expired = await pub.publish(f"{queue}-job", Step(n=1), expires=1)
        kept = await pub.publish(f"{queue}-job", Step(n=2), expires=60)
        await asyncio.sleep(2)  # the worker starts 2 s later
        async with running(worker):
            await wait_for(lambda: ran == [2], 15, "the unexpired job")
            await wait_for(lambda: len(_dead(broker, queue, 5)) == 1, 10, "the expired job")

            async def dead_status() -> object:
                # The dead status is written once the DLQ copy is confirmed, before the ack:
                # the copy can be readable a moment before the status.
                found = await pub.status(expired)
                return found if found is not None and found.state == "dead" else None

            status = await wait_for(dead_status, 10, "the expired job's dead status")
        assert (await pub.status(kept)) is not None
    (dead,) = _dead(broker, queue, 5)
    headers = dead["properties"]["headers"]
    assert headers["x-reason"] == "expired" and dead["properties"]["message_id"] == expired
    assert status is not None and status.state == "dead"
    assert ran == [2]


async def test_a_done_mark_waits_for_the_runs_follow_ups(
    broker: Broker, registry: CollectorRegistry, redis_db: redis.Redis
) -> None:
    """An ``idempotency_key=`` job whose follow-up the broker refuses the first time (no queue
    serves it yet) is given back; its rerun must run (no done mark yet) and publish the
    follow-up once it can. Marked as the handler returned, the rerun was skipped and the
    follow-up never went out."""
    exchange, queue, later = unique("ix"), unique("iq"), unique("late")
    settings = broker.settings(exchange=exchange, status_url=STATUS_URL)
    worker = Worker(settings, registry=registry)
    runs: list[int] = []
    children: list[str] = []

    @worker.job(f"{queue}-job", queue=queue, idempotency_key="{n}")
    async def parent(step: Step, ctx: JobContext) -> str:
        runs.append(step.n)
        await ctx.enqueue(f"{later}-child", {})
        return "parent done"

    child_worker = Worker(settings, registry=CollectorRegistry())

    @child_worker.job(f"{later}-child", queue=later)
    async def child(payload: dict[str, Any], ctx: JobContext) -> None:
        children.append(ctx.job_id)

    async with (
        running(worker),
        Publisher(settings=ConnectionSettings(amqp_url=broker.url, exchange=exchange)) as pub,
    ):
        await pub.publish(f"{queue}-job", {"n": 7})
        await wait_for(lambda: len(runs) >= 1, 10, "the first run")
        await asyncio.sleep(0.2)  # its follow-up is refused: no queue serves it yet
        async with running(child_worker):  # now one does
            await wait_for(lambda: children, 20, "the follow-up of a rerun")
    assert len(runs) >= 2  # the rerun ran: no done mark before its follow-ups were out
    assert len(children) == 1
