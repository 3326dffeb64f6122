"""What AMQP cannot carry (a short string over 255 bytes, a header value with no AMQP type) is a
clear ``ValueError`` at the edge, and one such message in a ``publish_batch`` fails only itself.

Real broker: the good jobs of a batch holding one unmarshallable item are confirmed and land.
"""

from __future__ import annotations

from dataclasses import dataclass

import aio_pika
import pytest
from pamqp.commands import Basic

from leveret.producers import Publisher
from leveret.producers.broker.batch import BatchPublishError, publish_batch
from leveret.producers.errors import InvalidMessageError, PublishError
from leveret.producers.publisher import Job
from leveret.producers.wire.message import check_message, job_properties
from leveret.topology import Topology, WorkQueue, declare
from leveret.topology.errors import LeveretError
from tests.support import Broker, unique


async def _declare(broker: Broker, queue: str, *jobs: str) -> None:
    connection = await aio_pika.connect(broker.url)
    try:
        await declare(connection, Topology(queues=(WorkQueue(name=queue, jobs=jobs),)))
    finally:
        await connection.close()


async def _drain_ids(broker: Broker, queue: str) -> list[str]:
    ids: list[str] = []
    connection = await aio_pika.connect(broker.url)
    try:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, passive=True)
        while (message := await q.get(fail=False, no_ack=True)) is not None:
            assert message.message_id is not None
            ids.append(message.message_id)
    finally:
        await connection.close()
    return ids


@dataclass
class _Item:
    """A message as the worker's outbox builds it (copies of deliveries: no edge check ran)."""

    job: str
    job_id: str
    body: bytes
    properties: Basic.Properties
    exchange: str
    routing_key: str


def _raw(job: str, job_id: str, headers: dict[str, object] | None = None) -> _Item:
    props = Basic.Properties(
        content_type="application/json",
        delivery_mode=2,
        message_id=job_id,
        message_type=job,
        headers=headers,
    )
    return _Item(job, job_id, b"{}", props, "jobs", job)


async def test_one_unmarshallable_item_fails_only_itself(broker: Broker) -> None:
    """A batch with an id of 300 bytes and a header holding a set among good jobs: the good
    ones are confirmed and in the queue, ``landed`` names them, each bad one is in ``errors``
    under its id with an ``InvalidMessageError`` (a ``PublishError``) saying why."""
    queue = unique("limits")
    job = f"{queue}-job"
    await _declare(broker, queue, job)
    long_id = "x" * 300
    items = [
        _raw(job, "good-1"),
        _raw(job, long_id),
        _raw(job, "good-2"),
        _raw(job, "bad-header", {"k": {1}}),
        _raw(job, "good-3"),
    ]
    connection = await aio_pika.connect(broker.url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        underlay = await channel.get_underlay_channel()
        with pytest.raises(BatchPublishError) as info:
            await publish_batch(underlay, items, timeout=10)  # type: ignore[arg-type]
        # The channel is still good afterwards.
        await publish_batch(underlay, [_raw(job, "good-4")], timeout=10)  # type: ignore[arg-type]
    finally:
        await connection.close()
    err = info.value
    assert err.landed == ["good-1", "good-2", "good-3"]
    assert list(err.errors) == [long_id, "bad-header"]
    assert all(isinstance(e, InvalidMessageError) for e in err.errors.values())
    assert all(isinstance(e, PublishError) and not e.maybe_queued for e in err.errors.values())
    assert "255" in str(err.errors[long_id])
    assert "'k'" in str(err.errors["bad-header"])
    assert sorted(await _drain_ids(broker, queue)) == ["good-1", "good-2", "good-3", "good-4"]


async def test_a_job_id_over_255_bytes_is_a_clear_error(broker: Broker) -> None:
    """300 characters, or 128 three-byte characters (384 bytes): a ``ValueError`` (an
    ``InvalidMessageError``) naming the job id and the limit, and nothing is sent."""
    queue = unique("limits")
    job = f"{queue}-job"
    await _declare(broker, queue, job)
    async with Publisher(broker.url) as pub:
        for bad in ("x" * 300, "€" * 128):
            with pytest.raises(ValueError, match=r"job id .*255 bytes") as info:
                await pub.publish(job, {}, job_id=bad)
            assert isinstance(info.value, LeveretError)
            with pytest.raises(ValueError, match=r"job id .*255 bytes"):
                await pub.publish_many([(job, {}), Job(job=job, payload={}, job_id=bad)])
        assert await pub.publish(job, {}, job_id="é" * 127) == "é" * 127  # 254 bytes: fine
    assert await _drain_ids(broker, queue) == ["é" * 127]


async def test_a_header_amqp_cannot_carry_is_a_clear_error(broker: Broker) -> None:
    """``headers={"k": {1}}`` (a set), a key over 128 bytes (AMQP's field-name limit; pamqp
    would truncate it silently), an integer past 64 bits: each a ``ValueError`` naming the
    header, before anything is sent."""
    queue = unique("limits")
    job = f"{queue}-job"
    await _declare(broker, queue, job)
    async with Publisher(broker.url) as pub:
        with pytest.raises(ValueError, match=r"header 'k'") as info:
            await pub.publish(job, {}, headers={"k": {1}})
        assert isinstance(info.value, InvalidMessageError)
        with pytest.raises(ValueError, match=r"header key .*128 bytes"):
            await pub.publish(job, {}, headers={"k" * 129: 1})
        with pytest.raises(ValueError, match=r"header 'big'"):
            await pub.publish(job, {}, headers={"big": 2**64})
        with pytest.raises(ValueError, match=r"header 'n'"):
            await pub.publish(job, {}, headers={"n": {"inner": object()}})
    assert await _drain_ids(broker, queue) == []


def test_check_message_is_what_the_worker_calls() -> None:
    """The one check, for properties built anywhere (the worker checks a delivery's copy)."""
    check_message(job_properties("j", "id-1", None, {"a": [1, "x", {"b": None}]}))
    with pytest.raises(InvalidMessageError, match="job id"):
        check_message(Basic.Properties(message_id="x" * 256, message_type="j"))
    with pytest.raises(InvalidMessageError, match="job name"):
        check_message(Basic.Properties(message_id="i", message_type="j" * 256))
    with pytest.raises(InvalidMessageError, match="reply_to"):
        check_message(Basic.Properties(message_id="i", reply_to="r" * 256))
