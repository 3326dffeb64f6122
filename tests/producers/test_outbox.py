"""The publishes of one loop turn share one socket write (``adapter.Outbox``), and keep every
guarantee a publish of its own has: its own confirm, its own typed error (unroutable, nacked,
timed out, connection lost), a held channel lock respected, and a publish given up on before the
write never sent.

Real broker throughout; the write queue is watched to count the writes.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiormq
import pytest
from aio_pika.abc import AbstractConnection
from pamqp.commands import Basic
from yarl import URL

from leveret.producers import ConnectionLost, ConnectionSettings, Publisher, PublishTimeout
from leveret.producers.broker.batch import _MARSHALLERS, BatchPublishError, publish_batch
from leveret.producers.broker.confirm import publish_confirmed
from leveret.producers.errors import PublishError, RefusedError, UnroutableError
from leveret.producers.wire.message import job_properties
from tests.faults.plumbing import TcpProxy
from tests.producers.test_batch import _declare, _drain_ids
from tests.support import Broker, unique


async def _confirming(connection: AbstractConnection) -> aiormq.Channel:
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    underlay = await channel.get_underlay_channel()
    assert isinstance(underlay, aiormq.Channel)
    return underlay


def _count_writes(channel: aiormq.Channel) -> list[int]:
    """Watch the writer's queue of ``channel``'s connection: the byte size of each frame put."""
    queue = channel.write_queue
    sizes: list[int] = []
    put_nowait, put = queue.put_nowait, queue.put

    def counting_nowait(frame: Any) -> None:
        sizes.append(len(frame.payload))
        put_nowait(frame)

    async def counting(frame: Any) -> None:
        sizes.append(len(frame.payload))
        await put(frame)

    queue.put_nowait = counting_nowait  # type: ignore[method-assign]
    queue.put = counting  # type: ignore[method-assign]
    return sizes


async def _publish(channel: aiormq.Channel, routing_key: str, job_id: str, **kw: Any) -> None:
    await publish_confirmed(
        channel,
        b"{}",
        exchange="",
        routing_key=routing_key,
        properties=job_properties("j", job_id),
        timeout=kw.pop("timeout", 10),
        **kw,
    )


async def test_concurrent_publishes_share_a_write_and_each_lands_once(broker: Broker) -> None:
    """500 publishes started in one loop turn: a handful of writes, not 500, and every id
    confirmed, in the queue exactly once, with its own body."""
    queue = unique("outbox")
    await _declare(broker, queue, f"{queue}-job")
    async with Publisher(broker.url) as pub:
        await pub.publish(f"{queue}-job", {"n": -1})  # the channel is open
        assert pub._channel is not None
        channel = await pub._channel.get_underlay_channel()
        assert isinstance(channel, aiormq.Channel)
        writes = _count_writes(channel)
        ids = await asyncio.gather(*(pub.publish(f"{queue}-job", {"n": i}) for i in range(500)))
    assert len(set(ids)) == 500
    assert 1 <= len(writes) <= 5, len(writes)
    got = await _drain_ids(broker, queue)
    assert sorted(got) == sorted([*ids, got[0]]) and len(got) == 501


async def test_each_publish_of_a_shared_write_gets_its_own_outcome(
    broker: Broker, connection: AbstractConnection
) -> None:
    """One loop turn's publishes to a queue holding 3 that refuses the rest, to no queue, and
    one AMQP cannot carry: each its own error (the returns matched by id), the others land."""
    full = unique("outbox-full")
    setup = await connection.channel()
    await setup.declare_queue(
        full, auto_delete=True, arguments={"x-max-length": 3, "x-overflow": "reject-publish"}
    )
    nobody = unique("outbox-nobody")
    channel = await _confirming(connection)
    writes = _count_writes(channel)
    plan = [(full, f"full-{i}") for i in range(8)]
    plan[2:2] = [(nobody, "nobody-1")]
    plan[6:6] = [(nobody, "nobody-2"), (full, "x" * 300)]
    outcomes = await asyncio.gather(
        *(_publish(channel, key, job_id) for key, job_id in plan), return_exceptions=True
    )
    by_id = dict(zip((job_id for _, job_id in plan), outcomes, strict=True))
    assert isinstance(by_id.pop("x" * 300), PublishError)  # never marshalled, never sent
    assert {i for i, o in by_id.items() if isinstance(o, UnroutableError)} == {
        "nobody-1",
        "nobody-2",
    }
    landed = {i for i, o in by_id.items() if o is None}
    refused = {i for i, o in by_id.items() if isinstance(o, RefusedError)}
    assert len(landed) == 3 and len(refused) == 5
    assert len(writes) == 1
    got = {m["properties"]["message_id"] for m in broker.get_messages(full, 10)}
    assert got == landed


async def test_a_held_channel_lock_holds_the_write_and_keeps_tag_order(
    broker: Broker, connection: AbstractConnection
) -> None:
    """While someone holds the channel lock (as aiormq's own publish does), the turn's write
    waits for it; a ``basic_publish`` already waiting goes first with its own tag, and every
    publish is confirmed as its own."""
    queue = unique("outbox-lock")
    await (await connection.channel()).declare_queue(queue, auto_delete=True)
    channel = await _confirming(connection)
    async with channel.lock:
        ours = [asyncio.create_task(_publish(channel, queue, f"ours-{i}")) for i in range(20)]
        await asyncio.sleep(0.05)
        assert not any(task.done() for task in ours)
    theirs = await channel.basic_publish(
        b"{}", routing_key=queue, properties=Basic.Properties(message_id="theirs")
    )
    assert isinstance(theirs, Basic.Ack)
    await asyncio.gather(*ours)
    got = [m["properties"]["message_id"] for m in broker.get_messages(queue, 30)]
    assert sorted(got) == sorted([*(f"ours-{i}" for i in range(20)), "theirs"])


async def test_a_publish_that_timed_out_before_its_write_is_never_sent(
    broker: Broker, connection: AbstractConnection
) -> None:
    """The channel lock held past a publish's timeout: it fails with a ``PublishTimeout`` saying
    it was not sent, soon after its deadline (the 10 ms grid), and it never reaches the queue
    once the lock is free; a publish after it lands."""
    queue = unique("outbox-timeout")
    await (await connection.channel()).declare_queue(queue, auto_delete=True)
    channel = await _confirming(connection)
    async with channel.lock:
        started = time.monotonic()
        with pytest.raises(PublishTimeout) as caught:
            await _publish(channel, queue, "late", timeout=0.2)
        waited = time.monotonic() - started
    assert caught.value.maybe_queued is False
    assert 0.19 <= waited < 0.5, waited
    await _publish(channel, queue, "next")
    assert [m["properties"]["message_id"] for m in broker.get_messages(queue, 5)] == ["next"]
    assert not _MARSHALLERS[channel].deadlines.ticks or all(
        not waits for waits in _MARSHALLERS[channel].deadlines.ticks.values()
    )


async def test_a_cancelled_publish_before_its_write_is_never_sent(
    broker: Broker, connection: AbstractConnection
) -> None:
    """A caller cancelled while its publish waits for the write: nothing of it is sent."""
    queue = unique("outbox-cancel")
    await (await connection.channel()).declare_queue(queue, auto_delete=True)
    channel = await _confirming(connection)
    async with channel.lock:
        task = asyncio.create_task(_publish(channel, queue, "cancelled"))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await _publish(channel, queue, "after")
    assert [m["properties"]["message_id"] for m in broker.get_messages(queue, 5)] == ["after"]


async def test_a_cut_connection_fails_every_waiting_publish(broker: Broker) -> None:
    """2,000 concurrent publishes and the TCP connection reset under them: each returns its id
    (and is then in the queue) or raises ``ConnectionLost``/``PublishTimeout``; none hangs."""
    queue = unique("outbox-cut")
    await _declare(broker, queue, f"{queue}-job")
    proxy = await TcpProxy("127.0.0.1", broker.amqp_port).start()
    try:
        via_proxy = str(URL(broker.url).with_port(proxy.port))
        settings = ConnectionSettings(amqp_url=via_proxy, publish_timeout=5)
        async with Publisher(settings=settings) as pub:
            calls = [pub.publish(f"{queue}-job", {"n": i}) for i in range(2_000)]
            gathered = asyncio.gather(*calls, return_exceptions=True)
            await asyncio.sleep(0.05)
            proxy.cut()
            outcomes = await asyncio.wait_for(gathered, 15)
    finally:
        await proxy.stop()
    landed = [o for o in outcomes if isinstance(o, str)]
    failed = [o for o in outcomes if not isinstance(o, str)]
    assert all(isinstance(o, ConnectionLost | PublishTimeout) for o in failed), {
        type(o).__name__ for o in failed
    }
    assert set(landed) <= set(await _drain_ids(broker, queue))


async def test_a_batch_and_single_publishes_share_a_write(
    broker: Broker, connection: AbstractConnection
) -> None:
    """``publish_batch`` calls of one turn (a worker's settle, a ``publish_many``) go out with
    the single publishes of that turn, each batch confirmed as its own."""
    queue = unique("outbox-mixed")
    await (await connection.channel()).declare_queue(queue, auto_delete=True)
    nobody = unique("outbox-nobody")
    channel = await _confirming(connection)
    writes = _count_writes(channel)

    class Item:
        def __init__(self, job_id: str, key: str) -> None:
            self.job, self.job_id, self.body = "j", job_id, b"{}"
            self.properties = job_properties("j", job_id)
            self.exchange, self.routing_key = "", key

    good = [Item(f"b-{i}", queue) for i in range(5)]
    mixed = [Item("m-0", queue), Item("m-1", nobody)]
    results = await asyncio.gather(
        publish_batch(channel, good, timeout=10),
        publish_batch(channel, mixed, timeout=10),
        _publish(channel, queue, "single"),
        return_exceptions=True,
    )
    assert results[0] is None and results[2] is None
    error = results[1]
    assert isinstance(error, BatchPublishError)
    assert error.landed == ["m-0"] and isinstance(error.errors["m-1"], UnroutableError)
    assert len(writes) == 1
    got = {m["properties"]["message_id"] for m in broker.get_messages(queue, 20)}
    assert got == {*(f"b-{i}" for i in range(5)), "m-0", "single"}


async def test_publishes_of_the_turn_a_channel_closes_in_end_with_it(
    broker: Broker, connection: AbstractConnection
) -> None:
    """Publishes handed over, then the channel closed while their write and confirms are on
    the way: each is confirmed (and in the queue) or ConnectionLost, none hangs; a publish on
    the closed channel is ConnectionLost at once."""
    queue = unique("outbox-close")
    await (await connection.channel()).declare_queue(queue, auto_delete=True)
    channel = await _confirming(connection)
    tasks = [asyncio.create_task(_publish(channel, queue, f"c-{i}")) for i in range(200)]
    await asyncio.sleep(0)  # handed to the outbox, not written yet
    await channel.close()
    outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert all(o is None or isinstance(o, ConnectionLost) for o in outcomes), outcomes
    landed = {f"c-{i}" for i, o in enumerate(outcomes) if o is None}
    got = {m["properties"]["message_id"] for m in broker.get_messages(queue, 250)}
    assert landed <= got
    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(_publish(channel, queue, "after-close"), 5)
