"""Upgrading a vhost from the v2 per-queue chains to the shared v3 chain loses no job.

A v2 layout (``tests/topology/v2.py``) holds jobs waiting at several delay levels, some
addressed to the queue (retries), some to the job name (delayed publishes); then a v3 worker
starts on the same exchange (it declares the v3 layout) and every job arrives exactly once,
including one a v2 publisher sends after the upgrade. Afterwards no binding leads into a v2
queue, so each, once empty, can be deleted on its own.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import quote

import aio_pika
from pydantic import BaseModel

from leveret.consumer import Worker
from leveret.topology import DELAY_BITS, Topology, WorkQueue, delay_levels, retry_queue_name
from leveret.topology.delay import delayed_job_route, retry_route, v2_exchange_name
from tests.support import Broker, running, unique, wait_for
from tests.topology.v2 import declare_v2

# Seconds; several set bits each, so they sit in different Q.retry.* queues at the upgrade.
# The longest outlast a v3 worker's start on a loaded machine (27 quorum delay queues declared).
DELAYS = (0.75, 1.25, 1.75, 2.0, 2.75, 3.25, 4.0, 4.75, 5.5, 9.0, 12.5)


class Payload(BaseModel):
    n: int


def _v2_entry(ex: str, delay: float, address: str, kind: str) -> tuple[str, str]:
    """Where a v2 publisher sent it: the v2 exchange of the highest bit, the same key."""
    route = retry_route if kind == "q" else delayed_job_route
    _, key = route(ex, delay, address)
    return v2_exchange_name(ex, max(delay_levels(delay))), key


async def _publish(url: str, ex: str, key: str, n: int, job: str) -> None:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(ex, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                f'{{"n": {n}}}'.encode(),
                content_type="application/json",
                type=job,
                message_id=f"m{n}",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=key,
            mandatory=True,
        )
    finally:
        await connection.close()


async def _v2_waiting(broker: Broker, queue: str) -> int:
    """Messages in the v2 queues now (passive declares: the API's figures lag seconds)."""
    return sum([await broker.depth(retry_queue_name(queue, n)) for n in range(DELAY_BITS)])


async def test_jobs_waiting_in_v2_chains_arrive_once_after_the_upgrade(
    broker: Broker, registry, queue_type: str
) -> None:
    ex = unique("up")
    queue = unique("upq")
    job = f"{queue}-job"
    v2 = Topology(exchange=ex, queues=(WorkQueue(name=queue, jobs=(job,), queue_type=queue_type),))
    connection = await aio_pika.connect(broker.url)
    try:
        await declare_v2(connection, v2)
    finally:
        await connection.close()
    first = time.monotonic()
    for i, delay in enumerate(DELAYS):
        kind, address = ("q", queue) if i % 2 == 0 else ("j", job)
        entry, key = _v2_entry(ex, delay, address, kind)
        await _publish(broker.url, entry, key, i, job)
    sent = time.monotonic()
    await asyncio.sleep(0.6)  # some have moved down a level already
    # Every job whose delay has not passed yet waits in the v2 chain (on a loaded machine the
    # shortest may already be through before the upgrade: that one proves nothing either way).
    not_due = sum(1 for d in DELAYS if d > time.monotonic() - first + 0.1)
    assert not_due >= 5
    assert await _v2_waiting(broker, queue) >= not_due

    worker = Worker(broker.settings(exchange=ex), registry=registry)
    seen: list[int] = []

    @worker.job(job, queue=queue)
    async def handle(p: Payload) -> None:
        seen.append(p.n)

    try:
        async with running(worker):
            # Still waiting in the v2 queues when the v3 layout is in place.
            assert await _v2_waiting(broker, queue) > 0
            late = len(DELAYS)  # a v2 publisher after the upgrade
            await _publish(broker.url, *_v2_entry(ex, 1.5, job, "j"), late, job)
            await wait_for(lambda: len(seen) >= late + 1, 30, "every job")
            await asyncio.sleep(1.5)  # a copy would arrive within a hop or two
            elapsed = time.monotonic() - sent
        assert sorted(seen) == list(range(late + 1)), seen
        assert elapsed < max(DELAYS) + 8
        bindings = broker.api(
            "GET", f"/exchanges/{broker.qvhost}/{quote(v2_exchange_name(ex, 3))}/bindings/source"
        ).json()
        assert not [b for b in bindings if ".retry." in b["destination"]], bindings
        assert await _v2_waiting(broker, queue) == 0
    finally:
        for n in range(DELAY_BITS):
            name = quote(retry_queue_name(queue, n), safe="")
            broker.api("DELETE", f"/queues/{broker.qvhost}/{name}")
        for prefix in (f"{ex}.delay.",):
            listed = broker.api("GET", f"/queues/{broker.qvhost}?columns=name").json()
            for q in listed:
                if q["name"].startswith(prefix) or q["name"] in (queue, f"{queue}.dlq"):
                    broker.api("DELETE", f"/queues/{broker.qvhost}/{quote(q['name'], safe='')}")
