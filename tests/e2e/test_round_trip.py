"""A job's whole round trip: publish, run, retry through the TTL chain, DLQ.

Each test runs on classic and on quorum queues (the ``queue_type`` fixture sets
``LEVERET_QUEUE_TYPE``) and first checks the worker really declared that type.
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

from leveret.consumer import JobContext, Reject, Worker
from leveret.producers import Publisher
from tests.support import Broker, assert_queue_types, running, unique, wait_for


class Payload(BaseModel):
    n: int


async def test_a_published_job_runs_once_and_is_acked(
    broker: Broker, registry, queue_type: str
) -> None:
    """A job published with the Publisher runs with its payload validated and is acked."""
    worker = Worker(broker.settings(), registry=registry)
    queue = unique("rt")
    seen: list[tuple[int, str, int]] = []

    @worker.job(f"{queue}-job", queue=queue)
    async def handle(p: Payload, ctx: JobContext) -> None:
        seen.append((p.n, ctx.job_id, ctx.attempt))

    async with running(worker):
        assert_queue_types(broker, queue, queue_type)
        async with Publisher(broker.url) as pub:
            job_id = await pub.publish(f"{queue}-job", {"n": 7})
        await wait_for(lambda: seen, 10, "the job to run")
        await asyncio.sleep(0.2)
    assert seen == [(7, job_id, 1)]
    assert await broker.depth(queue) == 0
    assert await broker.depth(f"{queue}.dlq") == 0


async def test_a_failing_job_retries_then_lands_in_the_dlq(
    broker: Broker, registry, queue_type: str
) -> None:
    """Each failure retries after the backoff; after max_attempts the DLQ gets it with headers."""
    worker = Worker(broker.settings(), registry=registry)
    queue = unique("rt")
    attempts: list[int] = []

    @worker.job(f"{queue}-job", queue=queue, max_attempts=3, backoff=0.25)
    async def handle(p: Payload, ctx: JobContext) -> None:
        attempts.append(ctx.attempt)
        raise RuntimeError("boom\nsecond line")

    async with running(worker):
        assert_queue_types(broker, queue, queue_type)
        async with Publisher(broker.url) as pub:
            job_id = await pub.publish(f"{queue}-job", {"n": 1})
        await wait_for(lambda: len(attempts) == 3, 15, "three attempts")
        await wait_for(lambda: broker.depth(f"{queue}.dlq"), 20, "the DLQ copy")
    assert attempts == [1, 2, 3]
    [dead] = broker.get_messages(f"{queue}.dlq")
    headers = dead["properties"]["headers"]
    assert headers["x-reason"] == "exhausted"
    assert headers["x-attempts"] == 3
    assert headers["x-error"] == "RuntimeError: boom second line"
    assert dead["properties"]["message_id"] == job_id
    assert dead["payload"] == '{"n":1}'


async def test_reject_goes_straight_to_the_dlq(broker: Broker, registry, queue_type: str) -> None:
    """Reject("why") dead-letters on the first attempt with x-reason rejected."""
    worker = Worker(broker.settings(), registry=registry)
    queue = unique("rt")

    @worker.job(f"{queue}-job", queue=queue, max_attempts=5)
    async def handle(p: Payload) -> None:
        raise Reject("not for us")

    async with running(worker):
        assert_queue_types(broker, queue, queue_type)
        async with Publisher(broker.url) as pub:
            await pub.publish(f"{queue}-job", {"n": 1})
        await wait_for(lambda: broker.depth(f"{queue}.dlq"), 15, "the DLQ copy")
    [dead] = broker.get_messages(f"{queue}.dlq")
    assert dead["properties"]["headers"]["x-reason"] == "rejected"
    assert dead["properties"]["headers"]["x-attempts"] == 1
    assert dead["properties"]["headers"]["x-error"] == "Reject: not for us"
