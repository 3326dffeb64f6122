"""The publisher: confirmed, mandatory, pipelined; errors that name the job."""

from __future__ import annotations

import asyncio
import time

import aio_pika
import pytest
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from leveret.producers import (
    BlockingPublisher,
    BrokerUnavailable,
    Job,
    Publisher,
    PublishError,
    UnroutableError,
)
from leveret.topology import Topology, WorkQueue, declare
from tests.support import Broker, unique


async def _declare(broker: Broker, queue: str, *jobs: str) -> None:
    connection = await aio_pika.connect(broker.url)
    try:
        await declare(connection, Topology(queues=(WorkQueue(name=queue, jobs=jobs),)))
    finally:
        await connection.close()


class Email(BaseModel):
    to: str


async def test_a_confirmed_job_is_in_its_queue_with_the_wire_format(broker: Broker) -> None:
    """publish returns the id only once the job sits in the queue with the v1 properties."""
    queue = unique("pub")
    await _declare(broker, queue, f"{queue}-job")
    async with Publisher(broker.url) as pub:
        job_id = await pub.publish(f"{queue}-job", Email(to="a@b.c"), priority=5)
    [msg] = broker.get_messages(queue)
    props = msg["properties"]
    assert props["message_id"] == job_id
    assert props["type"] == f"{queue}-job"
    assert props["content_type"] == "application/json"
    assert props["delivery_mode"] == 2
    assert props["priority"] == 5
    assert msg["payload"] == '{"to":"a@b.c"}'
    assert msg["routing_key"] == f"{queue}-job"


async def test_an_unroutable_job_raises_naming_the_job(broker: Broker) -> None:
    """No queue bound for the job: mandatory brings it back and publish raises."""
    async with Publisher(broker.url) as pub:
        with pytest.raises(UnroutableError, match="nobody-serves-this") as info:
            await pub.publish("nobody-serves-this", {"a": 1})
        assert info.value.job == "nobody-serves-this"
        # The channel stays usable after a return.
        with pytest.raises(UnroutableError):
            await pub.publish("nobody-serves-this", {"a": 1})


async def test_a_missing_exchange_is_a_clear_error(broker: Broker) -> None:
    """Publishing into a vhost where nothing was declared says to declare the topology."""
    from leveret.producers import ConnectionSettings

    settings = ConnectionSettings(amqp_url=broker.url, exchange=unique("noexchange"))
    async with Publisher(settings=settings) as pub:
        with pytest.raises(PublishError, match="topology declare"):
            await pub.publish("job", {"a": 1})


async def test_concurrent_publishes_are_pipelined(broker: Broker) -> None:
    """Concurrent publishes share confirm round trips: far faster than the same jobs in turn.

    Timed three times and judged on the best ratio: on a loaded 2-core machine one round can be
    disturbed, but confirm-by-confirm serialization would make every round about 1:1.
    """
    queue = unique("pub")
    await _declare(broker, queue, f"{queue}-job")
    ratios = []
    async with Publisher(broker.url) as pub:
        for _ in range(3):
            started = time.perf_counter()
            for i in range(300):
                await pub.publish(f"{queue}-job", {"i": i})
            one_by_one = time.perf_counter() - started
            started = time.perf_counter()
            jobs = (pub.publish(f"{queue}-job", {"i": i}) for i in range(300))
            ids = await asyncio.gather(*jobs)
            ratios.append((time.perf_counter() - started) / one_by_one)
            assert len(set(ids)) == 300
    assert await broker.depth(queue) == 1800
    # Serialized confirm by confirm, both would take about as long.
    assert min(ratios) < 0.5, ratios


async def test_publish_many_confirms_a_whole_batch(broker: Broker) -> None:
    """publish_many returns ids in order once every job in the batch is confirmed."""
    queue = unique("pub")
    await _declare(broker, queue, f"{queue}-job")
    async with Publisher(broker.url) as pub:
        ids = await pub.publish_many(
            [(f"{queue}-job", {"i": i}) for i in range(50)]
            + [Job(job=f"{queue}-job", payload={"i": 50}, job_id="fixed-id", priority=9)]
        )
    assert len(ids) == 51 and ids[-1] == "fixed-id"
    assert await broker.depth(queue) == 51


async def test_a_delayed_job_arrives_after_its_delay(broker: Broker) -> None:
    """delay=1 routes through the retry chain and reaches the queue no earlier than 1 s."""
    queue = unique("pub")
    await _declare(broker, queue, f"{queue}-job")
    async with Publisher(broker.url) as pub:
        started = time.monotonic()
        await pub.publish(f"{queue}-job", {"a": 1}, delay=1.0)
    assert await broker.depth(queue) == 0
    while await broker.depth(queue) == 0:
        assert time.monotonic() - started < 3, "delayed job never arrived"
        await asyncio.sleep(0.02)
    assert time.monotonic() - started >= 1.0


async def test_published_jobs_are_counted(broker: Broker) -> None:
    """leveret_jobs_published_total counts confirmed jobs per job name."""
    queue = unique("pub")
    await _declare(broker, queue, f"{queue}-job")
    registry = CollectorRegistry()
    async with Publisher(broker.url, registry=registry) as pub:
        for _ in range(3):
            await pub.publish(f"{queue}-job", {})
        with pytest.raises(UnroutableError):
            await pub.publish(f"{queue}-other", {})
    def published(job: str) -> float | None:
        return registry.get_sample_value("leveret_jobs_published_total", {"job_name": job})

    assert published(f"{queue}-job") == 3
    assert published(f"{queue}-other") in (None, 0)


async def test_bad_payloads_and_priorities_are_refused_before_sending(broker: Broker) -> None:
    """A list payload or a priority of 10 raises without touching the broker."""
    async with Publisher(broker.url) as pub:
        with pytest.raises(TypeError, match="dict or a pydantic model"):
            await pub.publish("j", [1, 2])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="priority"):
            await pub.publish("j", {}, priority=10)


async def test_wrong_credentials_never_show_the_password(broker: Broker) -> None:
    """A refused login raises BrokerUnavailable with the password masked."""
    url = broker.url.replace(f":{broker.password}@", ":Sup3r-S3cret-pw@")
    with pytest.raises(BrokerUnavailable) as info:
        async with Publisher(url):
            pass
    assert "Sup3r-S3cret-pw" not in str(info.value)
    assert "login refused" in str(info.value)


async def test_the_blocking_facade_publishes_from_plain_code(broker: Broker) -> None:
    """BlockingPublisher works from synchronous code (run here in a thread)."""
    queue = unique("pub")
    await _declare(broker, queue, f"{queue}-job")

    def sync_code() -> list[str]:
        with BlockingPublisher(broker.url) as pub:
            first = pub.publish(f"{queue}-job", {"a": 1})
            rest = pub.publish_many([(f"{queue}-job", {"a": i}) for i in range(9)])
            with pytest.raises(UnroutableError):
                pub.publish(f"{queue}-nobody", {})
            return [first, *rest]

    ids = await asyncio.to_thread(sync_code)
    assert len(ids) == 10
    assert await broker.depth(queue) == 10
