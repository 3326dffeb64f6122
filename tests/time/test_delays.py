"""Delayed jobs on the real broker: land no earlier than due and at most 1 s late.

A raw aio-pika consumer takes the jobs off the work queue so the measure is the chain's alone
(no worker start-up, no handler). The ETA test publishes with ``eta=`` an aware datetime in the
machine's local zone. Tests taking ``queue_type`` run on classic and on quorum queues, each on
an exchange of its own, so the chain they measure is of their type (the vhost's shared ``jobs``
chain is of whichever type declared it first).
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime, timedelta

import aio_pika
import pytest

from leveret.producers import Publisher
from leveret.producers.settings import ConnectionSettings
from leveret.topology import Topology, WorkQueue, declare
from leveret.topology.delay import (
    HOP_ALLOWANCE_S,
    MAX_LATENESS_S,
    delay_levels,
    delay_queue_names,
)
from tests.faults.plumbing import DedicatedNode
from tests.support import Broker, assert_queue_types, unique


async def _arrival(url: str, queue: str, timeout: float) -> tuple[str, float]:
    """Wait for one message on ``queue``; its id and wall-clock arrival time."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        q = await channel.get_queue(queue)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = await q.get(fail=False, no_ack=True)
            if message is not None:
                return message.message_id or "", time.time()
            await asyncio.sleep(0.01)
    finally:
        await connection.close()
    raise AssertionError(f"nothing arrived on {queue} within {timeout} s")


async def _declared(url: str, exchange: str = "jobs") -> tuple[str, str]:
    """A work queue of ``LEVERET_QUEUE_TYPE``'s type (classic unless a test sets it)."""
    name = unique("delay")
    queue_type = os.environ.get("LEVERET_QUEUE_TYPE", "classic")
    work = WorkQueue(name=name, jobs=(f"{name}-j",), queue_type=queue_type)  # type: ignore[arg-type]
    connection = await aio_pika.connect(url)
    try:
        await declare(connection, Topology(exchange=exchange, queues=(work,)))
    finally:
        await connection.close()
    return name, f"{name}-j"


def _publisher(url: str, exchange: str) -> Publisher:
    return Publisher(settings=ConnectionSettings(amqp_url=url, exchange=exchange))


def _assert_chain(broker: Broker, queue: str, exchange: str, queue_type: str) -> None:
    """The work queue, its DLQ and every delay queue of ``exchange`` are ``queue_type``."""
    assert_queue_types(broker, queue, queue_type)
    types = {broker.queue(name)["type"] for name in delay_queue_names(exchange)}
    assert types == {queue_type}, types


async def _lateness(
    url: str, delay: float, exchange: str = "jobs", broker: Broker | None = None
) -> float:
    queue, job = await _declared(url, exchange)
    if broker is not None:
        _assert_chain(broker, queue, exchange, os.environ.get("LEVERET_QUEUE_TYPE", "classic"))
    async with _publisher(url, exchange) as pub:
        sent = time.time()
        job_id = await pub.publish(job, {}, delay=delay)
    got, arrived = await _arrival(url, queue, delay + 10)
    assert got == job_id
    return arrived - sent - delay


@pytest.mark.parametrize("delay", [1.0, 7.0])
async def test_a_delayed_job_lands_inside_its_bound(broker: Broker, delay: float) -> None:
    late = await _lateness(broker.url, delay)
    assert 0 <= late < 1.0, late


@pytest.mark.slow
async def test_a_95_s_delay_lands_inside_its_bound(broker: Broker) -> None:
    late = await _lateness(broker.url, 95.0)
    assert 0 <= late < 1.0, late


async def test_each_hop_costs_less_than_its_allowance(broker: Broker, queue_type: str) -> None:
    """7.75 s is 31 units: five queues, no rounding; what is late is the five hops."""
    assert len(delay_levels(7.75)) == 5
    late = await _lateness(broker.url, 7.75, unique("dx"), broker)
    print(f"\n{queue_type}: 7.75 s delay (5 hops) {late * 1000:.0f} ms late")
    assert 0 <= late < 5 * HOP_ALLOWANCE_S + 0.05, late  # 0.05: publish/poll slack
    assert MAX_LATENESS_S < 1.0


async def test_an_eta_ten_seconds_ahead_runs_inside_its_bound(
    broker: Broker, queue_type: str
) -> None:
    exchange = unique("dx")
    queue, job = await _declared(broker.url, exchange)
    _assert_chain(broker, queue, exchange, queue_type)
    eta = (datetime.now(UTC) + timedelta(seconds=10)).astimezone()
    async with _publisher(broker.url, exchange) as pub:
        await pub.publish(job, {}, eta=eta)
    _, arrived = await _arrival(broker.url, queue, 20)
    assert 0 <= arrived - eta.timestamp() < 1.0


@pytest.mark.slow
async def test_a_pending_delayed_job_survives_a_broker_restart(node: DedicatedNode) -> None:
    """Published with a 20 s delay, the broker app restarts mid-wait, the job still lands."""
    queue, job = await _declared(node.url)
    async with Publisher(node.url) as pub:
        sent = time.time()
        job_id = await pub.publish(job, {}, delay=20)
    await asyncio.sleep(2)
    await asyncio.to_thread(node.ctl, "stop_app")
    await asyncio.to_thread(node.ctl, "start_app")
    await asyncio.to_thread(node.wait_app, True)
    got, arrived = await _arrival(node.url, queue, 60)
    assert got == job_id
    assert arrived - sent >= 20
