"""``publish_confirmed``: one message handed to the broker, known to have landed.

The publisher, the worker's outcome copies, DLQ replay, the scheduler and cancel broadcasts all
need the same guarantee: the message is in a queue, or the caller gets a typed error and must
assume it is not. A single publish is a batch of one (``producers.batch.publish_batch``): one
implementation, one error mapping; this only unwraps the batch's error into the job's own.

The channel must be an aiormq channel opened with ``publisher_confirms=True`` and
``on_return_raises=True`` (aio-pika: ``connection.channel(publisher_confirms=True,
on_return_raises=True)``, then ``get_underlay_channel()``), so that a ``mandatory`` publish that
no queue takes comes back as an error instead of a silent ack.
"""

from __future__ import annotations

import copy
import uuid
from typing import NamedTuple

import aiormq.abc
from pamqp.commands import Basic

from leveret.producers.broker.batch import BatchPublishError, publish_batch


class _One(NamedTuple):
    """The one item of the batch (what ``publish_batch`` reads of an item)."""

    job: str
    job_id: str
    body: bytes
    properties: Basic.Properties
    exchange: str
    routing_key: str
    mandatory: bool


async def publish_confirmed(
    channel: aiormq.abc.AbstractChannel,
    body: bytes,
    *,
    exchange: str,
    routing_key: str,
    properties: Basic.Properties,
    timeout: float | None,
    mandatory: bool = True,
    job: str | None = None,
) -> None:
    """Publish ``body`` and return once the broker confirmed it; raise otherwise.

    ``job`` names the message in errors (default: its ``type`` property, else the routing key).
    ``timeout`` bounds the whole wait for the confirm (``None``: wait forever); a broker blocked
    by a memory or disk alarm never confirms, and the caller must not hold its work forever.
    A message without a ``message_id`` is sent with a random one (a return is matched by it).

    Raises ``UnroutableError`` (returned: no queue took it), ``RefusedError`` (nacked, or a
    channel without confirms), ``PublishTimeout`` (no confirm in time: it may or may not be
    queued), ``ConnectionLost`` (the connection failed mid-publish; also a ``ConnectionError``,
    so reconnect loops treat it as one), ``InvalidMessageError`` (AMQP cannot carry it) and
    ``PublishError`` (the exchange does not exist).
    """
    name = job if job is not None else (properties.message_type or routing_key)
    message_id = properties.message_id
    if not message_id:  # a copy: the caller's properties may be reused for another message
        message_id = uuid.uuid4().hex
        properties = copy.copy(properties)
        properties.message_id = message_id
    item = _One(name, message_id, body, properties, exchange, routing_key, mandatory)
    try:
        await publish_batch(channel, (item,), timeout=timeout)
    except BatchPublishError as exc:
        raise exc.errors[message_id] from None
