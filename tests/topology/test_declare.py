"""Declaring the layout on a real broker."""

from __future__ import annotations

from urllib.parse import quote

import aio_pika
import pytest

from leveret.producers import Publisher
from leveret.producers.settings import ConnectionSettings
from leveret.topology import (
    DELAY_BITS,
    QueueMismatchError,
    Topology,
    WorkQueue,
    declare,
    delay_levels,
    delay_queue_name,
    delay_queue_names,
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
    assert len(first[0]) == 2  # Q and Q.dlq: the delay queues are the exchange's
    assert (("jobs", name, f"{name}-a")) in first[1]
    assert all(broker.queue_exists(n) for n in delay_queue_names("jobs"))
    assert len(delay_queue_names("jobs")) == DELAY_BITS


async def test_a_chain_of_the_other_queue_type_is_used_as_it_is(broker: Broker) -> None:
    """A classic app on an exchange whose delay chain is quorum (or the reverse) declares."""
    ex = unique("mix")
    names = [unique("mixq"), unique("mixq")]
    connection = await aio_pika.connect(broker.url)
    try:
        await declare(
            connection,
            Topology(exchange=ex, queues=(WorkQueue(name=names[0], queue_type="quorum"),)),
        )
        await declare(connection, Topology(exchange=ex, queues=(WorkQueue(name=names[1]),)))
        assert broker.queue(delay_queue_names(ex)[0])["type"] == "quorum"
    finally:
        await connection.close()
        for n in [*names, *(f"{q}.dlq" for q in names), *delay_queue_names(ex)]:
            broker.api("DELETE", f"/queues/{broker.qvhost}/{quote(n, safe='')}")


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
    ex = unique("longx")  # a chain of its own: the shared one holds other tests' messages
    topo = Topology(exchange=ex, queues=(WorkQueue(name=name, jobs=(f"{name}-job",)),))
    connection = await aio_pika.connect(broker.url)
    try:
        await declare(connection, topo)
    finally:
        await connection.close()
    settings = ConnectionSettings(amqp_url=broker.url, exchange=ex)
    async with Publisher(settings=settings) as pub:
        await pub.publish(f"{name}-job", {"n": 1}, delay=86_400)
    levels = delay_levels(86_400)
    first_stop = delay_queue_name(ex, max(levels))
    await wait_for(lambda: broker.depth(first_stop), 10, "the message in the first retry queue")
    assert await broker.depth(name) == 0
    ttl_sum = sum(
        broker.queue(delay_queue_name(ex, n))["arguments"]["x-message-ttl"] for n in levels
    )
    assert 86_400_000 <= ttl_sum < 86_400_000 + 8_640_000
