"""One scheduler in-process on the real broker: leader gauge, ticks counter, identity, stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aio_pika
import pytest
from prometheus_client import CollectorRegistry

from leveret.consumer.errors import ConfigError
from leveret.consumer.features.schedules.leader import (
    DEFAULT_APP,
    Scheduler,
    scheduler_queue_name,
    with_heartbeat,
)
from leveret.consumer.features.schedules.spec import format_tick, make_schedule, parse_tick
from tests.support import Broker, unique, wait_for


@contextlib.asynccontextmanager
async def _running(scheduler: Scheduler) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(scheduler.run())
    try:
        yield task
    finally:
        scheduler.stop()
        await asyncio.wait_for(task, 15)


def test_the_app_identity_does_not_depend_on_the_schedule_set() -> None:
    """Replicas of one app with different schedules (a rolling update) share one leadership."""
    a = [make_schedule("x", every=1, name="a"), make_schedule("y", cron="* * * * *", name="b")]
    registry = CollectorRegistry
    one = Scheduler("amqp://x", a, exchange="jobs", registry=registry())
    other = Scheduler("amqp://x", a[:1], exchange="jobs", registry=registry())
    assert one.app == other.app == DEFAULT_APP and one.queue == other.queue
    assert one.queue == scheduler_queue_name("jobs", DEFAULT_APP) == "jobs.scheduler.default"
    assert Scheduler("amqp://x", a, exchange="o", registry=registry()).queue != one.queue
    named = Scheduler("amqp://x", a, exchange="jobs", name="billing", registry=registry())
    assert named.queue == "jobs.scheduler.billing"
    with pytest.raises(ConfigError):
        Scheduler("amqp://x", a, exchange="e" * 150, name="n" * 150, registry=registry())


def test_a_url_gets_a_short_heartbeat_unless_it_names_one() -> None:
    assert with_heartbeat("amqp://h/v") == "amqp://h/v?heartbeat=1"
    assert with_heartbeat("amqp://h/v?heartbeat=5") == "amqp://h/v?heartbeat=5"


async def test_a_lone_scheduler_leads_fires_and_reports_it(broker: Broker) -> None:
    exchange, job = unique("sx"), unique("job")
    connection = await aio_pika.connect(broker.url)
    channel = await connection.channel()
    ex = await channel.declare_exchange(exchange, "direct", durable=True)
    queue = await channel.declare_queue(unique("collect"), durable=True)
    await queue.bind(ex, job)
    registry = CollectorRegistry()
    schedule = make_schedule(job, every=timedelta(seconds=1), name="beat", payload={"k": 1})
    scheduler = Scheduler(broker.url, [schedule], exchange=exchange, registry=registry)
    try:
        async with _running(scheduler):
            await wait_for(lambda: scheduler.is_leader, 10, "leadership")
            assert registry.get_sample_value("leveret_scheduler_leader") == 1
            await wait_for(
                lambda: (registry.get_sample_value(
                    "leveret_schedule_ticks_total", {"schedule": "beat"}) or 0) >= 2,
                10, "two ticks",
            )  # fmt: skip
        assert not scheduler.is_leader
        assert registry.get_sample_value("leveret_scheduler_leader") == 0
        message = await queue.get(no_ack=True)
        assert message.type == job and message.body == b'{"k":1}'
        assert (message.message_id or "").startswith("beat@")
        assert message.content_type == "application/json" and message.delivery_mode == 2
        # The state survives in the broker: one token, ready, holding the last fired tick.
        token_queue = await channel.declare_queue(
            scheduler.queue, durable=True, arguments={"x-single-active-consumer": True}
        )
        assert token_queue.declaration_result.message_count == 1
    finally:
        await connection.close()


async def test_duplicate_tokens_are_merged_to_the_newest_state(broker: Broker) -> None:
    """Two tokens wait in the queue (two bootstraps, or a crash between write and ack): the
    leader keeps the newest tick per schedule (so fires nothing at or before it) and leaves
    exactly one token."""
    exchange, job = unique("sx"), unique("job")
    schedule = make_schedule(job, every=1, name="beat")
    scheduler = Scheduler(broker.url, [schedule], exchange=exchange, registry=CollectorRegistry())
    connection = await aio_pika.connect(broker.url)
    try:
        channel = await connection.channel()
        ex = await channel.declare_exchange(exchange, "direct", durable=True)
        collect = await channel.declare_queue(unique("collect"), durable=True)
        await collect.bind(ex, job)
        tokens = await channel.declare_queue(
            scheduler.queue, durable=True, arguments={"x-single-active-consumer": True}
        )
        now = datetime.now(UTC)
        newest = schedule.latest_at_or_before(now)
        assert newest is not None
        for tick in (newest, newest - timedelta(seconds=10)):  # the newest first: order is moot
            body = {"ticks": {"beat": format_tick(tick)}, "heartbeat": now.timestamp()}
            await channel.default_exchange.publish(
                aio_pika.Message(json.dumps(body).encode(), message_id=str(tick)), tokens.name
            )
        async with _running(scheduler):
            await wait_for(lambda: scheduler.is_leader, 10, "leadership")
            await asyncio.sleep(2.5)
        fired = []
        while (message := await collect.get(no_ack=True, fail=False)) is not None:
            fired.append(parse_tick((message.message_id or "").split("@", 1)[1]))
        assert fired and min(fired) > newest, (fired, newest)
        again = await channel.declare_queue(
            scheduler.queue, durable=True, arguments={"x-single-active-consumer": True}
        )
        assert again.declaration_result.message_count == 1
    finally:
        await connection.close()


async def test_a_schedule_the_last_leader_did_not_know_counts_as_missed(broker: Broker) -> None:
    """A rollback: the token holds ``old`` from a minute ago (the leader since did not know it
    and kept it untouched) and a fresh heartbeat. The leader that knows it again fires the
    newest missed tick once (``missed="once"``), not the sixty ticks of the minute."""
    exchange, job = unique("sx"), unique("job")
    schedule = make_schedule(job, every=1, name="old")
    scheduler = Scheduler(broker.url, [schedule], exchange=exchange, registry=CollectorRegistry())
    connection = await aio_pika.connect(broker.url)
    try:
        channel = await connection.channel()
        ex = await channel.declare_exchange(exchange, "direct", durable=True)
        collect = await channel.declare_queue(unique("collect"), durable=True)
        await collect.bind(ex, job)
        tokens = await channel.declare_queue(
            scheduler.queue, durable=True, arguments={"x-single-active-consumer": True}
        )
        now = datetime.now(UTC)
        then = schedule.latest_at_or_before(now - timedelta(seconds=60))
        assert then is not None
        body = {"ticks": {"old": format_tick(then)}, "heartbeat": now.timestamp()}
        await channel.default_exchange.publish(
            aio_pika.Message(json.dumps(body).encode(), message_id="t"), tokens.name
        )
        async with _running(scheduler):
            await wait_for(lambda: scheduler.is_leader, 10, "leadership")
            await asyncio.sleep(1.5)
        fired = []
        while (message := await collect.get(no_ack=True, fail=False)) is not None:
            fired.append(parse_tick((message.message_id or "").split("@", 1)[1]))
        assert fired and len(fired) <= 4, fired  # the newest missed one, then the live ticks
        assert min(fired) >= now - timedelta(seconds=2), (fired, now)
        await collect.delete(if_unused=False, if_empty=False)
        await tokens.delete(if_unused=False, if_empty=False)
        await ex.delete()
    finally:
        await connection.close()
