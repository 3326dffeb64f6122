"""A vhost upgraded from the 19-level chain: old in-flight keys arrive, new keys are not copied.

Redeclaring only adds; the first layout's bindings (19 words of ``1``/``0``) stay on the v2
chain exchanges (the first layout used the same names) and still lead into the v2
``Q.retry.<ttl>`` queues. The test recreates them on a v2 vhost, as an upgraded broker has
them, upgrades it to v3, then sends one message in each format and counts arrivals.
"""

from __future__ import annotations

import asyncio
import time

import aio_pika
from aio_pika.abc import AbstractChannel

from leveret.topology import Topology, WorkQueue, declare
from leveret.topology.delay import (
    LEGACY_DELAY_BITS,
    delayed_job_route,
    retry_queue_name,
)
from leveret.topology.delay import v2_exchange_name as delay_exchange_name
from tests.support import Broker, unique
from tests.topology.v2 import declare_v2


def _legacy_pattern(level: int, bit: str, tail: str) -> str:
    words = [bit if n == level else "*" for n in reversed(range(LEGACY_DELAY_BITS))]
    return ".".join([*words, tail])


async def _add_legacy_bindings(channel: AbstractChannel, topo: Topology) -> None:
    """The bindings the 19-level layout declared (its queues and exchanges are still ours)."""
    ex = topo.exchange
    for n in range(LEGACY_DELAY_BITS - 1, -1, -1):
        down = await channel.get_exchange(delay_exchange_name(ex, n - 1))
        await down.bind(delay_exchange_name(ex, n), _legacy_pattern(n, "0", "#"))
    arrived = ".".join(["*"] * LEGACY_DELAY_BITS)
    for q in topo.queues:
        for addr in [f"q.{q.name}", *(f"j.{job}" for job in q.jobs)]:
            for n in range(LEGACY_DELAY_BITS):
                retry = await channel.get_queue(retry_queue_name(q.name, n))
                await retry.bind(delay_exchange_name(ex, n), _legacy_pattern(n, "1", addr))
            work = await channel.get_queue(q.name)
            await work.bind(delay_exchange_name(ex, -1), f"{arrived}.{addr}")


async def test_old_and_new_keys_each_arrive_exactly_once_on_an_upgraded_vhost(
    broker: Broker,
) -> None:
    name = unique("legacy")
    job = f"{name}-job"
    topo = Topology(exchange=unique("lx"), queues=(WorkQueue(name=name, jobs=(job,)),))
    connection = await aio_pika.connect(broker.url)
    try:
        await declare_v2(connection, topo)
        channel = await connection.channel()
        await _add_legacy_bindings(channel, topo)
        await declare(connection, topo)
        # Old format, 3 units (0.75 s), entering at its highest bit like the old publisher did.
        legacy_key = ".".join(["0"] * 17 + ["1", "1"]) + f".j.{job}"
        old = await channel.get_exchange(delay_exchange_name(topo.exchange, 1))
        # New format, 1.75 s: 7 units. Several of its '=' positions sit where old skip patterns
        # expect '0', so '1'/'0' words here would be copied down the chain more than once.
        new_ex, new_key = delayed_job_route(topo.exchange, 1.75, job)
        new = await channel.get_exchange(new_ex)
        sent = time.monotonic()
        await old.publish(aio_pika.Message(b"{}", message_id="old"), legacy_key)
        await new.publish(aio_pika.Message(b"{}", message_id="new"), new_key)
        work = await channel.get_queue(name)
        arrivals: list[tuple[str, float]] = []
        deadline = sent + 5
        while time.monotonic() < deadline:
            message = await work.get(fail=False, no_ack=True)
            if message is None:
                await asyncio.sleep(0.02)
                continue
            arrivals.append((message.message_id or "", time.monotonic() - sent))
    finally:
        await connection.close()
    ids = sorted(i for i, _ in arrivals)
    assert ids == ["new", "old"], arrivals
    waited = dict(arrivals)
    assert 0.75 <= waited["old"] < 0.75 + 1.0
    assert 1.75 <= waited["new"] < 1.75 + 1.0
