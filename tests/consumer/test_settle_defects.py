"""Settle defects of issue 21 (points 1, 2 and 12), each against the real broker.

1. a job id long enough that its event's id passes AMQP's 255 bytes poisoned the whole settle
   batch: every job settling in that loop turn was given back and ran twice, and the long one
   never left the loop;
2. a shutdown gave back a job whose copies were already on the wire: two live copies;
12. with several queues the prefetch was divided between them, so a busy queue ran fewer
    jobs at once than ``LEVERET_PREFETCH``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aio_pika
from prometheus_client import CollectorRegistry

from leveret.consumer import JobContext, Worker
from leveret.producers import Publisher
from leveret.producers.settings import ConnectionSettings
from tests.support import Broker, running, unique, wait_for


async def test_a_long_job_id_fails_nothing_else_in_its_settle_batch(
    broker: Broker, registry: CollectorRegistry
) -> None:
    exchange, queue = unique("ex"), unique("q")
    worker = Worker(broker.settings(exchange=exchange, events="outcomes"), registry=registry)
    runs: Counter[str] = Counter()

    @worker.job(f"{queue}-job", queue=queue)
    async def job(payload: dict[str, Any], ctx: JobContext) -> None:
        runs[ctx.job_id] += 1

    long_ids = ["L" * 250, "M" * 255]  # the wire allows 255; "<id>.succeeded.1" does not
    async with running(worker):
        await wait_for(lambda: worker.ready, 10, "the worker to be ready")
        connection = await aio_pika.connect(broker.url)
        try:
            channel = await connection.channel()
            ex = await channel.get_exchange(exchange)
            ids = [*long_ids, *(unique("short") for _ in range(30))]
            # All at once, so they settle together in few loop turns.
            await asyncio.gather(
                *(
                    ex.publish(
                        aio_pika.Message(b"{}", content_type="application/json", message_id=i),
                        routing_key=f"{queue}-job",
                    )
                    for i in ids
                )
            )
        finally:
            await connection.close()
        await wait_for(lambda: set(runs) >= set(ids), 20, "every job to run")
        await wait_for(lambda: broker.queue(queue).get("messages", 1) == 0, 15, "all acked")
        await asyncio.sleep(0.5)
    assert {i: n for i, n in runs.items() if n != 1} == {}  # none ran twice


async def test_shutdown_waits_for_a_settling_jobs_copies_instead_of_giving_it_back(
    broker: Broker, registry: CollectorRegistry
) -> None:
    """The grace ends while a job's follow-ups (50 of 400 KiB: they take a while to confirm)
    are on the wire: the job is acked once they are confirmed, not given back (which ran it
    again and published its follow-ups twice)."""
    exchange, queue, sink = unique("ex"), unique("q"), unique("sink")
    settings = broker.settings(exchange=exchange, shutdown_grace=0.0)
    worker = Worker(settings, registry=registry)
    returned = asyncio.Event()
    runs = 0
    blob = "x" * 400_000

    @worker.job(f"{queue}-job", queue=queue)
    async def job(payload: dict[str, Any], ctx: JobContext) -> None:
        nonlocal runs
        runs += 1
        for n in range(50):
            await ctx.enqueue(f"{sink}-job", {"n": n, "blob": blob})
        returned.set()

    @worker.job(f"{sink}-job", queue=sink)
    async def sink_job(payload: dict[str, Any]) -> None:
        pass

    async with (
        Publisher(settings=ConnectionSettings(amqp_url=broker.url, exchange=exchange)) as pub,
        running(worker, queues=[queue]),
    ):  # the sink is declared, not consumed
        await wait_for(lambda: worker.ready, 10, "ready")
        job_id = await pub.publish(f"{queue}-job", {})
        await returned.wait()
        # Leaving ``running`` stops the worker with grace 0 while the copies are in flight.
    assert runs == 1
    assert await broker.depth(queue) == 0, "the job was given back after its copies went out"
    assert await broker.depth(sink) == 50
    assert job_id


async def test_any_one_queue_can_use_the_whole_prefetch(
    broker: Broker, registry: CollectorRegistry
) -> None:
    """``LEVERET_PREFETCH=3`` on an app with two queues: a busy queue runs three jobs at once
    while the other is empty (it ran one at a time when the prefetch was divided)."""
    exchange, busy, idle = unique("ex"), unique("busy"), unique("idle")
    worker = Worker(broker.settings(exchange=exchange, prefetch=3), registry=registry)
    running_now = 0
    most = 0
    release = asyncio.Event()

    @worker.job(f"{busy}-job", queue=busy)
    async def busy_job(payload: dict[str, Any]) -> None:
        nonlocal running_now, most
        running_now += 1
        most = max(most, running_now)
        await release.wait()
        running_now -= 1

    @worker.job(f"{idle}-job", queue=idle)
    async def idle_job(payload: dict[str, Any]) -> None:
        pass

    async with (
        running(worker),
        Publisher(settings=ConnectionSettings(amqp_url=broker.url, exchange=exchange)) as pub,
    ):
        await wait_for(lambda: worker.ready, 10, "ready")
        for _ in range(6):
            await pub.publish(f"{busy}-job", {})
        await wait_for(lambda: most >= 3, 10, "three busy jobs at once")
        await asyncio.sleep(0.3)
        assert most == 3  # never more than the prefetch
        release.set()
