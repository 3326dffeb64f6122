"""Declaring the layout on a real broker."""

from __future__ import annotations

import aio_pika
import pytest

from leveret.producers import Publisher
from leveret.topology import (
    DELAY_BITS,
    QueueMismatchError,
    Topology,
    WorkQueue,
    declare,
    delay_levels,
    retry_queue_name,
)
from tests.support import Broker, unique, wait_for


def _snapshot(broker: Broker, prefix: str) -> tuple[list, list]:
    queues = sorted(
        (q["name"], q["durable"], sorted(q["arguments"].items()))
        for q in broker.api("GET", f"/queues/{broker.qvhost}").json()
        if q["name"].startswith(prefix)
    )
    bindings = sorted(
        (b["source"], b["destination"], b["routing_key"])
        for b in broker.api("GET", f"/bindings/{broker.qvhost}").json()
        if b["destination"].startswith(prefix)
    )
    return queues, bindings


async def test_declaring_twice_changes_nothing(broker: Broker) -> None:
    """A second declare leaves the same queues, arguments and bindings."""
    name = unique("decl")
    topo = Topology(queues=(WorkQueue(name=name, jobs=(f"{name}-a", f"{name}-b")),))
    connection = await aio_pika.connect(broker.url)
    try:
        await declare(connection, topo)
        first = _snapshot(broker, name)
        await declare(connection, topo)
        second = _snapshot(broker, name)
    finally:
        await connection.close()
    assert first == second
    assert len(first[0]) == 2 + DELAY_BITS == 29
    assert (("jobs", name, f"{name}-a")) in first[1]


async def test_a_queue_with_other_arguments_is_named_in_the_error(broker: Broker) -> None:
    """Redeclaring with another max priority fails naming the queue and the argument."""
    name = unique("decl")
    connection = await aio_pika.connect(broker.url)
    try:
        await declare(connection, Topology(queues=(WorkQueue(name=name, jobs=("j",)),)))
        changed = Topology(queues=(WorkQueue(name=name, jobs=("j",), max_priority=5),))
        with pytest.raises(QueueMismatchError) as info:
            await declare(connection, changed)
    finally:
        await connection.close()
    assert info.value.queue == name
    assert info.value.argument == "x-max-priority"
    assert info.value.existing == "10" and info.value.wanted == "5"
    assert name in str(info.value) and "x-max-priority" in str(info.value)


async def test_a_long_delay_enters_the_chain_at_its_highest_bit(broker: Broker) -> None:
    """A 24 h retry sits in the queue of its largest set bit; the bits sum to the delay."""
    name = unique("long")
    topo = Topology(queues=(WorkQueue(name=name, jobs=(f"{name}-job",)),))
    connection = await aio_pika.connect(broker.url)
    try:
        await declare(connection, topo)
    finally:
        await connection.close()
    async with Publisher(broker.url) as pub:
        await pub.publish(f"{name}-job", {"n": 1}, delay=86_400)
    levels = delay_levels(86_400)
    first_stop = retry_queue_name(name, max(levels))
    await wait_for(lambda: broker.depth(first_stop), 10, "the message in the first retry queue")
    assert await broker.depth(name) == 0
    ttl_sum = sum(
        broker.queue(retry_queue_name(name, n))["arguments"]["x-message-ttl"] for n in levels
    )
    assert 86_400_000 <= ttl_sum < 86_400_000 + 8_640_000
