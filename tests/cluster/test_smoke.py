"""The test cluster is a real cluster: one quorum queue, replicated on three nodes, reachable
through any of them, and still working with one node down."""

from __future__ import annotations

import asyncio
import time
import uuid
from urllib.parse import quote

import aio_pika
import pytest

from tests.cluster.cluster import Cluster

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _queue_info(cluster: Cluster, via: int, name: str) -> dict:
    return cluster.api(via, f"/api/queues/%2F/{quote(name, safe='')}")


async def _get(url: str, queue: str, timeout: float = 15) -> bytes:
    """Fetch one message from ``queue`` through the node at ``url`` and ack it."""
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        q = await ch.get_queue(queue, ensure=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = await q.get(fail=False)
            if msg is not None:
                await msg.ack()
                return msg.body
            await asyncio.sleep(0.1)
        raise AssertionError(f"no message in {queue} through {url} within {timeout} s")
    finally:
        await conn.close()


async def _publish(url: str, queue: str, body: bytes) -> None:
    """Publish with confirms: returns only once the queue's majority has the message."""
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel(publisher_confirms=True)
        await ch.default_exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue,
            timeout=30,
        )
    finally:
        await conn.close()


async def _wait_online(cluster: Cluster, name: str, count: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    info: dict = {}
    while time.monotonic() < deadline:
        info = await asyncio.to_thread(_queue_info, cluster, 0, name)
        if len(info.get("online") or []) == count and info.get("leader"):
            return info
        await asyncio.sleep(0.5)
    raise AssertionError(f"{name}: expected {count} members online, last saw {info}")


async def test_quorum_queue_across_nodes_survives_one_node_down(cluster: Cluster) -> None:
    a, b, c = cluster.amqp_urls
    names = [n.name for n in cluster.nodes]
    assert await asyncio.to_thread(cluster.running_nodes, 2) == sorted(names)

    queue = f"smoke-{uuid.uuid4().hex[:8]}"
    conn = await aio_pika.connect(a)
    try:
        ch = await conn.channel()
        await ch.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
    finally:
        await conn.close()
    info = await _wait_online(cluster, queue, 3)
    assert sorted(info["members"]) == sorted(names), "the queue is not replicated on all nodes"

    await _publish(b, queue, b"one")
    assert await _get(c, queue) == b"one"

    await asyncio.to_thread(cluster.stop_node, 1)
    try:
        running = await asyncio.to_thread(cluster.wait_running, 2)
        assert names[1] not in running
        info = await _wait_online(cluster, queue, 2)
        assert names[1] not in info["online"]
        # Two of three members are a majority: the queue still confirms and delivers.
        await _publish(a, queue, b"two")
        assert await _get(c, queue) == b"two"
    finally:
        await asyncio.to_thread(cluster.start_node, 1)
    assert len(await asyncio.to_thread(cluster.wait_running, 3)) == 3
    info = await _wait_online(cluster, queue, 3)
    assert names[1] in info["online"]
    # The restarted member serves the queue again, and nothing was left behind or duplicated.
    await _publish(b, queue, b"three")
    assert await _get(b, queue) == b"three"

    conn = await aio_pika.connect(a)
    try:
        ch = await conn.channel()
        left = await ch.declare_queue(queue, passive=True)
        assert left.declaration_result.message_count == 0
        await ch.queue_delete(queue)
    finally:
        await conn.close()
