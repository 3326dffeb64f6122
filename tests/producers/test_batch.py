"""``publish_many`` through ``producers.batch``: one write per batch, confirms by tag range.

Every test talks to the real broker; each checks the guarantee per job id: confirmed and in
its queue, or named in ``BatchPublishError`` with its own typed error.
"""

from __future__ import annotations

import asyncio
import json

import aio_pika
import pytest
from pamqp.commands import Basic
from yarl import URL

from leveret.producers import ConnectionLost, Publisher, RefusedError, UnroutableError
from leveret.producers.broker.batch import BatchPublishError, _Marshaller
from leveret.producers.wire.message import job_properties
from leveret.topology import Topology, WorkQueue, declare
from tests.faults.plumbing import TcpProxy
from tests.support import Broker, unique


async def _declare(broker: Broker, queue: str, *jobs: str) -> None:
    connection = await aio_pika.connect(broker.url)
    try:
        await declare(connection, Topology(queues=(WorkQueue(name=queue, jobs=jobs),)))
    finally:
        await connection.close()


async def _drain_ids(broker: Broker, queue: str) -> list[str]:
    """Every message id in ``queue``, consumed (acked) once each."""
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


def test_templated_headers_are_pamqp_bytes() -> None:
    """A header spliced from a template is byte for byte what pamqp marshals (ids and sizes
    vary; a header with a nested table gets no template and is marshalled per job)."""
    from pamqp import frame
    from pamqp.header import ContentHeader

    m = _Marshaller(3, 131_064)
    for i, headers in enumerate([None, {"a": 1}, {"a": True}, {"n": {"deep": [1]}}] * 3):
        props = job_properties("j", f"id-{i:04d}-{'x' * i}", None, headers)
        want = frame.marshal(ContentHeader(0, 100 + i, props), 3)
        assert m.header(props, 100 + i) == want
    assert None in m.templates.values() or len(m.templates) >= 3


def test_per_job_stamps_are_spliced_into_one_template() -> None:
    """What varies per job besides its id and size (the ``timestamp`` and 64-bit integer headers
    such as ``x-published-at`` or ``x-expires-at``) is spliced: one template serves jobs
    published in different seconds, and every header is pamqp's bytes. Smaller integers, a
    ``True`` and a naive or other-zone time are each byte-exact too."""
    from datetime import UTC, datetime, timedelta, timezone

    from pamqp import frame
    from pamqp.header import ContentHeader

    m = _Marshaller(3, 131_064)
    start = datetime(2026, 12, 7, 12, tzinfo=UTC)
    for i in range(40):
        props = job_properties("j", f"{i:036d}", None, {"x-expires-at": 2**41 + i, "n": -(2**40)})
        props.timestamp = start + timedelta(seconds=i)
        props.headers = {**props.headers, "x-published-at": 1_796_000_000_000 + 997 * i}
        assert m.header(props, 100 + i) == frame.marshal(ContentHeader(0, 100 + i, props), 3)
    assert len(m.templates) == 1 and None not in m.templates.values()
    others = [
        (datetime(2026, 1, 1), {"small": 7, "flag": True}),  # naive: pamqp takes it as UTC
        (datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=-5))), {"u32": 2**32 - 1}),
        (None, {"i64": -(2**63), "top": 2**63 - 1}),
    ]
    for n, (stamp, headers) in enumerate(others):
        props = Basic.Properties(message_id=f"o-{n}", timestamp=stamp, headers=headers)
        assert m.header(props, 5) == frame.marshal(ContentHeader(0, 5, props), 3)


async def test_ten_thousand_jobs_all_confirmed_and_consumed_once(broker: Broker) -> None:
    """10k jobs in batches of 2,500: every id returned, each in the queue exactly once, with
    its own body."""
    queue = unique("batch")
    await _declare(broker, queue, f"{queue}-job")
    ids: list[str] = []
    async with Publisher(broker.url) as pub:
        for first in range(0, 10_000, 2_500):
            ids += await pub.publish_many(
                (f"{queue}-job", {"n": i}) for i in range(first, first + 2_500)
            )
    assert len(ids) == len(set(ids)) == 10_000
    assert await broker.depth(queue) == 10_000
    got = await _drain_ids(broker, queue)
    assert sorted(got) == sorted(ids)
    # Bodies travelled with their own ids (spot check through the management API is capped:
    # publish one more small batch and read it back).
    async with Publisher(broker.url) as pub:
        few = await pub.publish_many((f"{queue}-job", {"n": i}) for i in range(5))
    messages = broker.get_messages(queue, 10)
    assert [m["properties"]["message_id"] for m in messages] == few
    assert [json.loads(m["payload"])["n"] for m in messages] == list(range(5))


async def test_unroutable_jobs_of_a_batch_are_named_exactly(broker: Broker) -> None:
    """A batch mixing a served job and one no queue is bound for: the error names exactly the
    unroutable ids (UnroutableError each), ``landed`` the others, which are in the queue."""
    queue = unique("batch")
    await _declare(broker, queue, f"{queue}-job")
    items = [(f"{queue}-job" if i % 3 else f"{queue}-nobody", {"n": i}) for i in range(300)]
    async with Publisher(broker.url) as pub:
        with pytest.raises(BatchPublishError) as info:
            await pub.publish_many(items)
        err = info.value
        assert len(err.errors) == 100 and len(err.landed) == 200
        assert all(isinstance(e, UnroutableError) for e in err.errors.values())
        assert {e.job for e in err.errors.values()} == {f"{queue}-nobody"}
        # The channel is still good for the next batch.
        again = await pub.publish_many([(f"{queue}-job", {"n": 1})])
    got = await _drain_ids(broker, queue)
    assert sorted(got) == sorted([*err.landed, *again])
    assert not set(err.errors) & set(got)


async def test_a_nacked_batch_reports_which_ids_landed(broker: Broker) -> None:
    """A queue holding at most 40 that rejects publishes beyond: of 100, exactly the 40
    that landed are in ``landed`` and in the queue; the 60 others are RefusedError each."""
    queue = unique("batch")
    job = f"{queue}-job"
    connection = await aio_pika.connect(broker.url)
    try:
        channel = await connection.channel()
        q = await channel.declare_queue(
            queue, durable=True, arguments={"x-max-length": 40, "x-overflow": "reject-publish"}
        )
        exchange = await channel.declare_exchange("jobs", aio_pika.ExchangeType.DIRECT,
                                                  durable=True, passive=True)  # fmt: skip
        await q.bind(exchange, routing_key=job)
    finally:
        await connection.close()
    async with Publisher(broker.url) as pub:
        with pytest.raises(BatchPublishError) as info:
            await pub.publish_many((job, {"n": i}) for i in range(100))
    err = info.value
    assert len(err.landed) == 40 and len(err.errors) == 60
    assert all(isinstance(e, RefusedError) for e in err.errors.values())
    assert sorted(await _drain_ids(broker, queue)) == sorted(err.landed)


async def test_a_connection_dropping_mid_batch_names_the_unconfirmed_ids(broker: Broker) -> None:
    """The TCP connection reset while a big batch is in flight: every id is either in
    ``landed`` (and then in the queue) or named with a ConnectionLost; none is lost silently."""
    queue = unique("batch")
    await _declare(broker, queue, f"{queue}-job")
    proxy = await TcpProxy("127.0.0.1", broker.amqp_port).start()
    try:
        via_proxy = str(URL(broker.url).with_port(proxy.port))
        async with Publisher(via_proxy) as pub:
            task = asyncio.create_task(
                pub.publish_many((f"{queue}-job", {"n": i}) for i in range(20_000))
            )
            await asyncio.sleep(0.15)  # the batch is written; confirms are coming in
            assert not task.done()
            assert proxy.cut() >= 1
            with pytest.raises(BatchPublishError) as info:
                await task
    finally:
        await proxy.stop()
    err = info.value
    assert len(err.landed) + len(err.errors) == 20_000
    assert err.errors, "the cut came after every confirm: make the batch bigger"
    assert all(isinstance(e, ConnectionLost) for e in err.errors.values())
    assert str(len(err.errors)) in str(err) and next(iter(err.errors)) in str(err)
    in_queue = set(await _drain_ids(broker, queue))
    assert set(err.landed) <= in_queue  # every confirmed id is really queued
