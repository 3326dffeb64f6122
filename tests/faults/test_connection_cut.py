"""Scenario 2: every connection cut mid-run, twice; the worker recovers by itself."""

from __future__ import annotations

import asyncio
import collections
import time

import aio_pika
import httpx
from pydantic import BaseModel
from yarl import URL

from leveret.consumer import JobContext, Worker
from leveret.producers import Publisher
from leveret.producers.publisher import Job
from tests.faults.plumbing import TcpProxy, free_port, record
from tests.support import Broker, assert_queue_types, running, unique, wait_for

JOBS_PER_QUEUE = 1000
PREFETCH = 20


class Item(BaseModel):
    n: int


async def consumers(broker: Broker, queue: str) -> int:
    """Consumers on ``queue`` right now (passive declare: exact, unlike management stats)."""
    connection = await aio_pika.connect(broker.url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.consumer_count or 0


async def test_cutting_every_connection_twice_loses_nothing(
    broker: Broker, registry, queue_type: str
) -> None:
    """Two cuts: /readyz goes 503 then 200, consumers come back on each queue, every job runs."""
    proxy = await TcpProxy("127.0.0.1", broker.amqp_port).start()
    via_proxy = str(URL(broker.url).with_port(proxy.port))
    port = free_port()
    worker = Worker(
        broker.settings(
            amqp_url=via_proxy, metrics_port=port, metrics_host="127.0.0.1", prefetch=PREFETCH
        ),
        registry=registry,
    )
    q1, q2 = unique("cut-a"), unique("cut-b")
    runs: collections.Counter[str] = collections.Counter()

    @worker.job(f"{q1}-job", queue=q1)
    async def one(item: Item, ctx: JobContext) -> None:
        runs[ctx.job_id] += 1
        await asyncio.sleep(0.01)

    @worker.job(f"{q2}-job", queue=q2)
    async def two(item: Item, ctx: JobContext) -> None:
        runs[ctx.job_id] += 1
        await asyncio.sleep(0.01)

    recoveries: list[float] = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=2) as http:

        async def readyz() -> int:
            return (await http.get("/readyz")).status_code

        async with running(worker):
            assert await readyz() == 200
            for q in (q1, q2):
                assert_queue_types(broker, q, queue_type)
            async with Publisher(broker.url) as pub:
                ids = []
                for q in (q1, q2):
                    ids += await pub.publish_many(
                        [Job(job=f"{q}-job", payload={"n": i}) for i in range(JOBS_PER_QUEUE)]
                    )
            for cut in (1, 2):
                await wait_for(lambda c=cut: len(runs) >= 500 * c, 30, f"progress before cut {cut}")
                proxy.down = True
                assert proxy.cut() >= 1
                await wait_for(lambda: _is(readyz, 503), 5, "/readyz to answer 503")
                await asyncio.sleep(1.5)  # the outage: the worker keeps failing to reconnect
                assert await readyz() == 503
                assert not worker.ready
                done_during_outage = len(runs)
                proxy.down = False
                restored = time.monotonic()
                await wait_for(lambda: _is(readyz, 200), 30, "/readyz back to 200")
                recoveries.append(time.monotonic() - restored)
                for q in (q1, q2):
                    await wait_for(lambda q=q: _eq(consumers(broker, q), 1), 10, f"consumer on {q}")
                await wait_for(lambda n=done_during_outage: len(runs) > n, 10, "jobs flowing again")
            await wait_for(lambda: set(runs) >= set(ids), 60, "every job to run", interval=0.1)
            for q in (q1, q2):
                assert await broker.depth(q) == 0
                assert await broker.depth(f"{q}.dlq") == 0
    await proxy.stop()
    lost = set(ids) - set(runs)
    duplicated = [i for i, n in runs.items() if n > 1]
    assert not lost
    # Only jobs in flight at a cut may run twice: at most what the worker held per cut, which
    # with two queues is a prefetch window per queue (each consumer may hold the prefetch, v3).
    assert len(duplicated) <= 2 * 2 * PREFETCH, len(duplicated)
    record(
        "connection cut x2 (TCP proxy)",
        queue_type=queue_type,
        jobs=len(ids),
        lost=len(lost),
        duplicated=len(duplicated),
        recovery_s=round(max(recoveries), 2),
    )


async def _is(probe, status: int) -> bool:  # type: ignore[no-untyped-def]
    try:
        return await probe() == status
    except httpx.HTTPError:
        return False


async def _eq(value, expected: int) -> bool:  # type: ignore[no-untyped-def]
    return await value == expected
