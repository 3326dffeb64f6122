"""Apply a ``Topology`` to a broker, idempotently; probe a queue without changing it.

RabbitMQ treats a redeclaration with identical arguments as a no-op, so declaring twice changes
nothing. A redeclaration with *different* arguments closes the channel with a bare
``PRECONDITION_FAILED``; that is turned into a ``QueueMismatchError`` naming the queue and the
argument, because "inequivalent arg" on a shared channel is the kind of message that costs an
operator an hour.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import aio_pika
import aiormq
import aiormq.abc
from aio_pika.abc import AbstractConnection, ExchangeType

from .errors import QueueMismatchError, TopologyError
from .model import Topology

_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for (?P<kind>queue|exchange) '(?P<name>[^']+)'"
    r".*?received (?:the value )?(?P<wanted>'[^']*'|\S+)(?: of type '[^']*')? but current is "
    r"(?:the value )?(?P<existing>'[^']*'|\S+)"
)


def _mismatch(exc: Exception, fallback_name: str) -> TopologyError:
    text = str(exc)
    match = _INEQUIVALENT.search(text)
    if match:
        return QueueMismatchError(
            match["name"], match["arg"], match["existing"].strip("'"), match["wanted"].strip("'")
        )
    return TopologyError(
        f"the broker refused to declare {fallback_name!r}: {text}; it probably exists with "
        f"other settings: compare it in the management UI and delete or rename it"
    )


async def declare(connection: AbstractConnection, topology: Topology) -> None:
    """Declare exchanges, queues and bindings on a channel of their own.

    A private channel keeps a refused declaration (which closes its channel) from taking down
    the caller's consuming or publishing channel.
    """
    channel = await connection.channel(publisher_confirms=False)
    try:
        exchanges = {}
        for ex in topology.exchanges():
            try:
                exchanges[ex.name] = await channel.declare_exchange(
                    ex.name, ExchangeType(ex.type), durable=ex.durable
                )
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise _mismatch(exc, ex.name) from None
        queues = {}
        for q in topology.queue_decls():
            try:
                queues[q.name] = await channel.declare_queue(
                    q.name, durable=q.durable, arguments=q.arguments
                )
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise _mismatch(exc, q.name) from None
        for b in topology.bindings():
            source = exchanges[b.source]
            if b.destination_type == "queue":
                await queues[b.destination].bind(source, routing_key=b.routing_key)
            else:
                await exchanges[b.destination].bind(source, routing_key=b.routing_key)
    finally:
        if not channel.is_closed:
            await channel.close()


async def declare_url(url: str, topology: Topology) -> None:
    """Connect, declare, disconnect: for the CLI and one-off scripts."""
    connection = await aio_pika.connect(url)
    try:
        await declare(connection, topology)
    finally:
        await connection.close()


class QueueCounts(NamedTuple):
    """What a passive ``queue.declare`` says: exact and current, unlike the management API."""

    messages: int  # ready (not unacked) messages
    consumers: int


async def probe_queue(channel: aiormq.abc.AbstractChannel, name: str) -> QueueCounts | None:
    """Ready messages and consumers of ``name`` by a passive declare; ``None`` if it does not exist.

    The one passive probe every tool uses (status, doctor, DLQ, the worker's DLQ gauge). A
    missing queue makes the broker close ``channel`` (``NOT_FOUND``): after ``None`` the caller
    must open a new channel, which is why probes belong on a channel of their own.
    """
    try:
        ok = await channel.queue_declare(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return None
    return QueueCounts(ok.message_count or 0, ok.consumer_count or 0)


async def queue_depth(channel: aiormq.abc.AbstractChannel, name: str) -> int | None:
    """Ready messages in ``name``, or ``None`` if it does not exist (``probe_queue`` semantics)."""
    counts = await probe_queue(channel, name)
    return None if counts is None else counts.messages
