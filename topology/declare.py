"""Apply a ``Topology`` to a broker, idempotently; probe a queue without changing it.

RabbitMQ treats a redeclaration with identical arguments as a no-op, so declaring twice changes
nothing. A redeclaration with *different* arguments closes the channel with a bare
``PRECONDITION_FAILED``; that is turned into a ``QueueMismatchError`` naming the queue and the
argument, because "inequivalent arg" on a shared channel is the kind of message that costs an
operator an hour.

Declaring also finishes an upgrade from the v2 layout (per-queue ``Q.retry.<ttl>`` queues, see
``topology.delay``): it removes the v2 bindings that would copy a delayed message into both
chains, after the ``#`` forwards from the v2 exchanges to the v3 chain are in place (a copy
too many for a moment rather than a message lost). The v2 queues themselves are left alone:
what waits there keeps flowing to its work queue; ``leveret doctor`` says when each is empty.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import aio_pika
import aiormq
import aiormq.abc
from aio_pika.abc import AbstractConnection, ExchangeType

from leveret.topology.delay import DELAY_BITS
from leveret.topology.errors import QueueMismatchError, TopologyError
from leveret.topology.model import QueueDecl, QueueType, Topology
from leveret.topology.versions import Version, quorum_dlq_arguments, version_from_server_properties

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


def declaration_variants(topology: Topology, version: Version | None) -> dict[str, list[QueueDecl]]:
    """Per queue, the declarations ``declare`` accepts, the one it asks for first.

    * A delay queue: the chain as this app would have it, else as the other queue type (the
      chain is shared by every app on the exchange; the first to declare it chose).
    * A quorum DLQ on a broker that accepts it (``versions.quorum_dlq_arguments``, 4.0+): with
      ``x-delivery-limit: -1``, else as it exists (a DLQ declared before the broker upgrade;
      ``leveret doctor`` reports its limit).
    """
    other: QueueType = "classic" if topology.delay_queue_type == "quorum" else "quorum"
    delay_other = {d.name: d for d in topology.delay_queues(other)}
    dlqs = {q.dlq for q in topology.queues if q.queue_type == "quorum"}
    extra = quorum_dlq_arguments(version)
    out: dict[str, list[QueueDecl]] = {}
    for d in topology.queue_decls():
        if d.name in delay_other:
            out[d.name] = [d, delay_other[d.name]]
        elif d.name in dlqs and extra:
            out[d.name] = [QueueDecl(d.name, {**d.arguments, **extra}, d.durable), d]
        else:
            out[d.name] = [d]
    return out


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
        version = None
        if connection.transport is not None:
            version = version_from_server_properties(
                connection.transport.connection.server_properties
            )
        variants = declaration_variants(topology, version)
        delay = {d.name for d in topology.delay_queues()}
        queues = {}
        delay_fell_back = False
        for wanted in topology.queue_decls():
            tries = variants[wanted.name]
            if delay_fell_back and wanted.name in delay:
                tries = tries[::-1]  # the chain exists as the other type: ask for that first
            first_error: Exception | None = None
            for i, q in enumerate(tries):
                try:
                    queues[q.name] = await channel.declare_queue(
                        q.name, durable=q.durable, arguments=q.arguments
                    )
                except aiormq.exceptions.ChannelPreconditionFailed as exc:
                    first_error = first_error or exc
                    # The refusal closed the channel: go on with a new one.
                    channel = await connection.channel(publisher_confirms=False)
                    exchanges = {n: await channel.get_exchange(n, ensure=False) for n in exchanges}
                    queues = {n: await channel.get_queue(n, ensure=False) for n in queues}
                    continue
                delay_fell_back = delay_fell_back or (wanted.name in delay and i > 0)
                break
            else:
                assert first_error is not None
                raise _mismatch(first_error, wanted.name) from None
        for b in topology.core_bindings():
            source = exchanges[b.source]
            if b.destination_type == "queue":
                await queues[b.destination].bind(source, routing_key=b.routing_key)
            else:
                await exchanges[b.destination].bind(source, routing_key=b.routing_key)
        await _upgrade_v2(connection, await channel.get_underlay_channel(), topology)
    finally:
        if not channel.is_closed:
            await channel.close()


async def _v2_queues_present(connection: AbstractConnection, topology: Topology) -> set[str]:
    """The v2 ``Q.retry.<ttl>`` queues of the topology's work queues that still exist."""
    present: set[str] = set()
    probe = await (await connection.channel(publisher_confirms=False)).get_underlay_channel()
    try:
        for q in topology.queues:
            names = q.v2_retry_queues
            # v2 declared all 27 together: if neither end is there, none of them is.
            for name in (names[0], names[-1], *names[1:-1]):
                if await probe_queue(probe, name) is None:
                    probe = await (
                        await connection.channel(publisher_confirms=False)
                    ).get_underlay_channel()
                    if name == names[-1] and names[0] not in present:
                        break
                else:
                    present.add(name)
    finally:
        if not probe.is_closed:
            await probe.close()
    return present


async def _upgrade_v2(
    connection: AbstractConnection, channel: aiormq.abc.AbstractChannel, topology: Topology
) -> None:
    """Forward each v2 exchange into the v3 chain, and remove its v2 bindings, bit by bit.

    AMQP cannot swap bindings atomically. The forward comes first, so for the round trip
    between it and the unbinds a message passing that v2 exchange may be copied into both
    chains (a duplicate, which at-least-once delivery allows), never routed nowhere (a loss).
    Unbinding from a missing queue would close the channel, hence the probes.
    """
    present = await _v2_queues_present(connection, topology)
    for level in range(DELAY_BITS - 1, -1, -1):
        forward = topology.v2_forward(level)
        await channel.exchange_bind(forward.destination, forward.source, forward.routing_key)
        skip = topology.v2_skip_binding(level)
        await channel.exchange_unbind(skip.destination, skip.source, routing_key=skip.routing_key)
        for q in topology.queues:
            for b in topology.v2_retry_bindings(q, level):
                if b.destination in present:
                    await channel.queue_unbind(b.destination, b.source, routing_key=b.routing_key)


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
