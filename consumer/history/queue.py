"""``<exchange>.history``: the durable queue the history writers consume the outcome events from.

Declared by the writer and, where ``LEVERET_HISTORY_URL`` is set, by every worker at start: the
worker publishes events without ``mandatory`` (nobody need be bound), so an event published
before any writer had declared the queue would reach no queue and its row would never be
written. Declared from the worker's start, it holds every event until a writer takes it.
Imports nothing of the history store (a worker needs no PostgreSQL client for this).
"""

from __future__ import annotations

from typing import Final, Literal

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractQueue
from aiormq.abc import FieldTable

from leveret.producers.wire import CANCELLED, DEAD, RETRYING, STARTED, SUCCEEDED, events_exchange

BOUND_STATES: Final = (SUCCEEDED, RETRYING, DEAD, CANCELLED, STARTED)


def history_queue(exchange: str) -> str:
    """``<exchange>.history``: the writers' shared queue."""
    return f"{exchange}.history"


def routing_keys() -> list[str]:
    return [f"*.{state}" for state in BOUND_STATES]


async def declare_history_queue(
    channel: AbstractChannel, exchange: str, queue_type: Literal["classic", "quorum"] = "classic"
) -> AbstractQueue:
    """The events exchange, the history queue (of the app's queue type) and its bindings."""
    events = await channel.declare_exchange(
        events_exchange(exchange), aio_pika.ExchangeType.TOPIC, durable=True
    )
    arguments: FieldTable | None = {"x-queue-type": "quorum"} if queue_type == "quorum" else None
    queue = await channel.declare_queue(history_queue(exchange), durable=True, arguments=arguments)
    for key in routing_keys():
        await queue.bind(events, key)
    return queue
