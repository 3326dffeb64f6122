"""Outcomes: a job is acked only after its outcome is durable.

* succeeded: the handler returned, so the work is done; ack.
* retried: a copy with ``x-attempts`` goes into the delayed-retry chain; ack once the broker
  confirmed the copy.
* dead-lettered: a copy with ``x-reason``/``x-error``/``x-attempts`` goes to ``Q.dlq``; ack once
  confirmed.

If a copy cannot be confirmed (connection lost, broker nack, or no confirm within
``LEVERET_PUBLISH_TIMEOUT``, e.g. during a memory alarm) the original is not acked: the broker
redelivers it and it runs again. A duplicate at worst, never a loss. The copies go out on a
connection of their own, so a publisher the broker blocks never holds up the acks.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import aiormq
import structlog
from pamqp.commands import Basic

from leveret.producers.connection import CONNECTION_ERRORS
from leveret.producers.message import (
    HEADER_ATTEMPTS,
    HEADER_DIED_AT,
    HEADER_ERROR,
    HEADER_QUEUE,
    HEADER_REASON,
    PERSISTENT,
    one_line,
)
from leveret.topology.model import dlq_name, retry_route

from .acker import Acker

log = structlog.get_logger("leveret.worker")

# Headers Leveret itself manages; never copied from one attempt to the next.
_OWN_HEADERS = frozenset({HEADER_ATTEMPTS, HEADER_REASON, HEADER_ERROR, HEADER_DIED_AT,
                          HEADER_QUEUE, "x-redeliveries", "x-delivery-count", "x-death",
                          "x-first-death-exchange",
                          "x-first-death-queue", "x-first-death-reason",
                          "x-last-death-exchange", "x-last-death-queue",
                          "x-last-death-reason"})  # fmt: skip


class SettleFailed(Exception):
    """The outcome copy was not confirmed; the original must stay unacked."""


def copy_properties(
    props: Basic.Properties, job: str | None, job_id: str, headers: dict[str, Any]
) -> Basic.Properties:
    """The original's properties for a new copy, minus what would break or mislead it.

    ``expiration`` would fight the retry queues' TTL; ``user_id`` must name the publishing
    connection's user, which is ours now.
    """
    return Basic.Properties(
        content_type=props.content_type,
        content_encoding=props.content_encoding,
        headers=headers or None,
        delivery_mode=PERSISTENT,
        priority=props.priority,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        message_id=job_id,
        timestamp=props.timestamp,
        message_type=job,
        app_id=props.app_id,
    )


def carried_headers(props: Basic.Properties) -> dict[str, Any]:
    headers = props.headers
    if not headers:
        return {}
    return {k: v for k, v in headers.items() if k not in _OWN_HEADERS}


class Settler:
    """Publishes outcome copies on a confirming channel and hands done tags to the acker."""

    def __init__(
        self,
        publish_channel: aiormq.abc.AbstractChannel,
        acker: Acker,
        exchange: str,
        *,
        timeout_s: float | None = None,
    ) -> None:
        self.channel = publish_channel
        self.acker = acker
        self._exchange = exchange
        # A confirm that never comes (memory alarm, quorum queue without a majority) must end
        # as a failed settle, not hold the job's prefetch slot forever.
        self._timeout_s = timeout_s

    async def _publish(
        self, body: bytes, exchange: str, routing_key: str, properties: Basic.Properties
    ) -> None:
        try:
            async with asyncio.timeout(self._timeout_s):
                confirmation = await self.channel.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=properties,
                    mandatory=True,
                )
        except TimeoutError:
            raise SettleFailed(
                f"outcome copy not confirmed within {self._timeout_s:g} s "
                f"(LEVERET_PUBLISH_TIMEOUT; is the broker blocking publishers?)"
            ) from None
        except (aiormq.exceptions.DeliveryError, *CONNECTION_ERRORS) as exc:
            raise SettleFailed(f"{type(exc).__name__}: {exc}") from None
        if not isinstance(confirmation, Basic.Ack):
            raise SettleFailed(f"broker answered {type(confirmation).__name__}")

    async def retry(
        self,
        message: aiormq.abc.DeliveredMessage,
        queue: str,
        job: str,
        job_id: str,
        attempts: int,
        delay_s: float,
    ) -> None:
        props = message.header.properties
        headers = carried_headers(props)
        headers[HEADER_ATTEMPTS] = attempts
        exchange, routing_key = retry_route(self._exchange, delay_s, queue)
        await self._publish(
            message.body,
            exchange,
            routing_key,
            copy_properties(props, job, job_id, headers),
        )
        self.acker.ack(message.delivery.delivery_tag)

    async def requeue_counted(
        self,
        message: aiormq.abc.DeliveredMessage,
        queue: str,
        job: str,
        job_id: str,
        attempts: int,
        redeliveries: int,
    ) -> None:
        """Put a redelivered job back with its redelivery count persisted in a header."""
        props = message.header.properties
        headers = carried_headers(props)
        if attempts:
            headers[HEADER_ATTEMPTS] = attempts
        headers["x-redeliveries"] = redeliveries
        await self._publish(message.body, "", queue, copy_properties(props, job, job_id, headers))
        # Acked at once, not coalesced: the copy may be delivered (and crash a worker) before a
        # coalesced ack would go out, leaving two uncounted copies of the job.
        await self.acker.ack_now(message.delivery.delivery_tag)

    async def give_back(
        self, message: aiormq.abc.DeliveredMessage, queue: str, job: str, job_id: str
    ) -> None:
        """Return an unfinished job to its queue as it came: no attempt, no redelivery counted.

        The copy carries the *resolved* job name and id, like every copy Leveret publishes: a
        job sent without ``type`` (named by its routing key) would otherwise come back named
        after its queue, and one without ``message_id`` would get a new id.

        ``basic.nack(requeue=True)`` would flag it redelivered, and the next worker's redelivery
        guard would count a graceful shutdown as a crash: a long job caught by a few rolling
        deploys would reach the DLQ without ever failing. A confirmed copy, then an ack, does not.
        """
        props = message.header.properties
        headers = dict(props.headers) if props.headers else None
        copy = copy_properties(props, job, job_id, headers or {})
        await self._publish(message.body, "", queue, copy)
        self.acker.ack(message.delivery.delivery_tag)

    async def dead_letter(
        self,
        message: aiormq.abc.DeliveredMessage,
        queue: str,
        job: str,
        job_id: str,
        *,
        reason: str,
        error: str,
        attempts: int,
    ) -> None:
        props = message.header.properties
        headers = carried_headers(props)
        headers[HEADER_REASON] = reason
        headers[HEADER_ERROR] = one_line(error)
        headers[HEADER_ATTEMPTS] = attempts
        headers[HEADER_DIED_AT] = datetime.now(UTC).isoformat(timespec="milliseconds")
        headers[HEADER_QUEUE] = queue
        await self._publish(
            message.body, "", dlq_name(queue), copy_properties(props, job, job_id, headers)
        )
        self.acker.ack(message.delivery.delivery_tag)
