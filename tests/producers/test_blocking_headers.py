"""``BlockingPublisher.publish(..., headers=...)``, as the contract's ``publish`` has it: the
user's headers reach the queue with the job, on the real broker."""

from __future__ import annotations

import asyncio

import aio_pika

from leveret.producers import BlockingPublisher
from leveret.topology import Topology, WorkQueue, declare
from tests.support import Broker, unique


async def test_the_blocking_publish_carries_the_users_headers(broker: Broker) -> None:
    queue = unique("bhdr")
    connection = await aio_pika.connect(broker.url)
    try:
        await declare(connection, Topology(queues=(WorkQueue(name=queue, jobs=(f"{queue}-job",)),)))
    finally:
        await connection.close()

    def sync_code() -> str:
        with BlockingPublisher(broker.url) as pub:
            return pub.publish(f"{queue}-job", {"a": 1}, headers={"tenant": "acme", "trace": "t-1"})

    job_id = await asyncio.to_thread(sync_code)
    [msg] = broker.get_messages(queue)
    assert msg["properties"]["message_id"] == job_id
    headers = msg["properties"]["headers"]
    assert headers["tenant"] == "acme"
    assert headers["trace"] == "t-1"
