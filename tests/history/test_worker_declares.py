"""A worker with ``LEVERET_HISTORY_URL`` declares the history queue: an outcome event published
before any history writer ever ran waits there (it reached no queue before, and its row was
never written)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from leveret import Publisher, Worker
from leveret.consumer.history.queue import history_queue
from leveret.producers.settings import ConnectionSettings
from tests.support import Broker, running, unique, wait_for


async def test_outcome_events_wait_for_a_writer_that_never_ran(
    broker: Broker, registry: CollectorRegistry
) -> None:
    exchange, queue = unique("hx"), unique("hq")
    # No PostgreSQL is asked anything by the worker: the URL only turns the history on.
    settings = broker.settings(exchange=exchange, history_url="postgresql://nobody@127.0.0.1/x")
    assert settings.events_mode == "outcomes"
    worker = Worker(settings, registry=registry)

    @worker.job(f"{queue}-job", queue=queue)
    async def job(payload: dict[str, Any]) -> None:
        pass

    async with (
        running(worker),
        Publisher(settings=ConnectionSettings(amqp_url=broker.url, exchange=exchange)) as pub,
    ):
        assert broker.queue_exists(history_queue(exchange))
        for _ in range(3):
            await pub.publish(f"{queue}-job", {})
        await wait_for(
            lambda: broker.depth(history_queue(exchange)),
            15,
            "the outcome events in the history queue",
        )
    assert await broker.depth(history_queue(exchange)) == 3
    broker.api("DELETE", f"/queues/{broker.qvhost}/{history_queue(exchange)}")
