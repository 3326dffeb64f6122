"""The status keeper on the real broker: events in, statuses out, Redis outages survived."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection

from leveret.consumer.status_keeper import StatusKeeper, status_queue_name
from leveret.producers.events import EventState, build_event, events_exchange, routing_key
from leveret.producers.status import MemoryStatusStore, RedisStatusStore, StatusStore
from tests.support import Broker, unique, wait_for

from .conftest import PrivateRedis, shared_redis_store


@pytest.fixture
async def connection(broker: Broker) -> AsyncIterator[AbstractRobustConnection]:
    conn = await aio_pika.connect_robust(broker.url)
    try:
        yield conn
    finally:
        await conn.close()


class Events:
    """Publishes event bodies to ``<exchange>.events`` with confirms, as the worker will."""

    def __init__(self, connection: AbstractRobustConnection, exchange: str) -> None:
        self.connection = connection
        self.exchange_name = events_exchange(exchange)
        self._exchange: Any = None

    async def publish_raw(self, body: bytes, key: str = "x.started") -> None:
        if self._exchange is None:
            channel = await self.connection.channel()
            self._exchange = await channel.get_exchange(self.exchange_name)
        message = aio_pika.Message(
            body, content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
        )
        await self._exchange.publish(message, routing_key=key)

    async def publish(self, job_id: str, state: EventState, attempt: int, **extra: Any) -> None:
        body = build_event(
            job_id=job_id, job="resize", queue="images", state=state, attempt=attempt, **extra
        )
        await self.publish_raw(body, routing_key("resize", state))


async def state_of(store: StatusStore, job_id: str) -> tuple[str, int] | None:
    status = await store.get(job_id)
    return None if status is None else (status.state, status.attempt)


async def eventually(
    store: StatusStore, job_id: str, want: tuple[str, int], timeout: float
) -> float:
    """Seconds until ``job_id`` reads ``want``; fails after ``timeout``."""
    started = time.monotonic()

    async def reached() -> bool:
        return await state_of(store, job_id) == want

    await wait_for(reached, timeout, f"{job_id} to read {want}", interval=0.01)
    return time.monotonic() - started


async def test_declares_a_durable_queue_and_keeps_statuses_within_one_second(
    broker: Broker, connection: AbstractRobustConnection
) -> None:
    exchange = unique("jobs")
    async with shared_redis_store() as store:
        keeper = StatusKeeper(connection, store, exchange=exchange, prefetch=16)
        await keeper.start()
        try:
            queue = broker.queue(status_queue_name(exchange))
            assert queue["name"] == f"{exchange}.events.status" and queue["durable"]
            bindings = broker.api(
                "GET",
                f"/exchanges/{broker.qvhost}/{exchange}.events/bindings/source",
            ).json()
            assert [(b["destination"], b["routing_key"]) for b in bindings] == [
                (f"{exchange}.events.status", "#")
            ]
            events = Events(connection, exchange)
            for i in range(5):
                await events.publish(f"job-{i}", "started", 1)
                assert await eventually(store, f"job-{i}", ("started", 1), 1.0) < 1.0
                await events.publish(f"job-{i}", "succeeded", 1, result={"i": i})
                assert await eventually(store, f"job-{i}", ("succeeded", 1), 1.0) < 1.0
                status = await store.get(f"job-{i}")
                assert status is not None and status.result == {"i": i}
            assert keeper.applied == 10
        finally:
            await keeper.stop()
    assert await broker.depth(status_queue_name(exchange)) == 0  # every event was acked


async def test_redis_down_then_back_the_status_catches_up(
    broker: Broker, connection: AbstractRobustConnection, private_redis: PrivateRedis
) -> None:
    exchange = unique("jobs")
    store = RedisStatusStore.from_url(private_redis.url, timeout=1)
    keeper = StatusKeeper(connection, store, exchange=exchange, backoff_initial=0.2, backoff_max=1)
    await keeper.start()
    events = Events(connection, exchange)
    try:
        await events.publish("a", "started", 1)
        await eventually(store, "a", ("started", 1), 1.0)

        private_redis.stop()
        await events.publish("a", "progress", 1, progress=0.5)
        await events.publish("a", "succeeded", 1, result="done")
        await events.publish("b", "started", 1)
        await events.publish("b", "retrying", 1, error="E")
        await wait_for(lambda: not keeper.healthy, 5, "the keeper to notice the outage")
        await asyncio.sleep(2.5)
        # Backoff, not a busy loop: probes at 0.2, 0.4, 0.8, 1, 1 ... s.
        assert 2 <= keeper.failures <= 6
        assert keeper.applied == 1  # nothing was acked without being written

        private_redis.start()
        await eventually(store, "a", ("succeeded", 1), 5)
        await eventually(store, "b", ("retrying", 1), 5)
        status = await store.get("a")
        assert status is not None and (status.result, status.progress) == ("done", 0.5)
        assert keeper.healthy and keeper.failures == 0
        # The keeper goes on working normally afterwards.
        await events.publish("c", "started", 1)
        assert await eventually(store, "c", ("started", 1), 1.0) < 1.0
    finally:
        await keeper.stop()
        await store.close()
    assert await broker.depth(status_queue_name(exchange)) == 0


async def test_a_keeper_dying_during_an_outage_loses_nothing(
    broker: Broker, connection: AbstractRobustConnection, private_redis: PrivateRedis
) -> None:
    exchange = unique("jobs")
    store = RedisStatusStore.from_url(private_redis.url, timeout=1)
    first = StatusKeeper(connection, store, exchange=exchange, backoff_initial=0.2)
    await first.start()
    events = Events(connection, exchange)
    try:
        private_redis.stop()
        for job in ("a", "b", "c"):
            await events.publish(job, "started", 1)
            await events.publish(job, "dead", 1, error="ValueError: no")
        await wait_for(lambda: not first.healthy, 5, "the keeper to notice the outage")
    finally:
        await first.stop(grace=0.5)  # the process goes away holding six events
    queue = status_queue_name(exchange)
    await wait_for(lambda: broker.depth(queue), 5, "the events to return to the queue")
    assert await broker.depth(queue) == 6

    private_redis.start()
    second = StatusKeeper(connection, store, exchange=exchange)
    await second.start()
    try:
        for job in ("a", "b", "c"):
            await eventually(store, job, ("dead", 1), 5)
    finally:
        await second.stop()
        await store.close()


async def test_a_malformed_event_does_not_stop_the_keeper(
    broker: Broker, connection: AbstractRobustConnection
) -> None:
    exchange = unique("jobs")
    store = MemoryStatusStore()
    keeper = StatusKeeper(connection, store, exchange=exchange)
    await keeper.start()
    events = Events(connection, exchange)
    try:
        await events.publish_raw(b"\x00 not json at all")
        await events.publish_raw(b'{"job_id": "a", "state": "started"}')
        await events.publish("a", "started", 1)
        await eventually(store, "a", ("started", 1), 1.0)
        await wait_for(lambda: keeper.rejected == 2, 2, "both bad events to be counted")
    finally:
        await keeper.stop()
    assert await broker.depth(status_queue_name(exchange)) == 0  # acked, not looping


async def test_several_keepers_on_one_queue(
    broker: Broker, connection: AbstractRobustConnection
) -> None:
    """Keepers in every worker process share the queue; order and duplicates do not matter."""
    exchange = unique("jobs")
    async with shared_redis_store() as store:
        keepers = [StatusKeeper(connection, store, exchange=exchange, prefetch=8) for _ in range(3)]
        for keeper in keepers:
            await keeper.start()
        events = Events(connection, exchange)
        history: list[tuple[EventState, int, dict[str, Any]]] = [
            ("started", 1, {}),
            ("progress", 1, {"progress": 0.5}),
            ("retrying", 1, {"error": "E"}),
            ("started", 2, {}),
            ("succeeded", 2, {"result": [1]}),
        ]
        try:
            rng = random.Random(3)
            sends = [(f"job-{j}", s, a, x) for j in range(30) for s, a, x in history]
            rng.shuffle(sends)
            await asyncio.gather(*(events.publish(j, s, a, **x) for j, s, a, x in sends))
            for j in range(30):
                await eventually(store, f"job-{j}", ("succeeded", 2), 5)
            await wait_for(
                lambda: sum(k.applied + k.ignored for k in keepers) == len(sends),
                5,
                "every event to be handled",
            )
            assert all(k.applied + k.ignored > 0 for k in keepers)  # the work was shared
        finally:
            for keeper in keepers:
                await keeper.stop()
