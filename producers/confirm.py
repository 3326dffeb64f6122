"""``publish_confirmed``: the one way Leveret hands a message to the broker and knows it landed.

The publisher, the worker's outcome copies (retry, dead-letter, give back), DLQ replay and the
scheduler all need the same guarantee: the message is in a queue, or the caller gets a typed
error and must assume it is not. Each used to carry its own copy of this with its own timeout
and its own idea of which exceptions mean what; this is the single copy.

The channel must be an aiormq channel opened with ``publisher_confirms=True`` and
``on_return_raises=True`` (aio-pika: ``connection.channel(publisher_confirms=True,
on_return_raises=True)``, then ``get_underlay_channel()``), so that a ``mandatory`` publish that
no queue takes comes back as an error instead of a silent ack.
"""

from __future__ import annotations

import asyncio

import aiormq
import aiormq.abc
from pamqp.commands import Basic

from .connection import CONNECTION_ERRORS
from .errors import ConnectionLost, PublishError, PublishTimeout, RefusedError, UnroutableError


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

    Raises ``UnroutableError`` (returned: no queue took it), ``RefusedError`` (nacked),
    ``PublishTimeout`` (no confirm in time: it may or may not be queued), ``ConnectionLost``
    (the connection failed mid-publish; also a ``ConnectionError``, so reconnect loops treat it
    as one) and ``PublishError`` (the exchange does not exist).
    """
    name = job if job is not None else (properties.message_type or routing_key)
    try:
        async with asyncio.timeout(timeout):
            confirmation = await channel.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=mandatory,
                # Don't wait for the frame to reach the socket: the confirm comes after it
                # anyway, and waiting holds aiormq's channel lock through every drain, which
                # serialises concurrent publishers on one channel.
                wait=False,
            )  # type: ignore[call-arg]  # aiormq's AbstractChannel omits the Channel's `wait`
    except TimeoutError:
        raise PublishTimeout(name, timeout if timeout is not None else 0.0) from None
    except aiormq.exceptions.PublishError:
        raise UnroutableError(name, exchange, routing_key) from None
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise PublishError(
            name,
            f"exchange {exchange!r} does not exist; run `leveret topology declare APP` "
            f"or start a worker first",
        ) from None
    except aiormq.exceptions.DeliveryError as exc:
        raise RefusedError(name, str(exc.frame) if exc.frame else "") from None
    except CONNECTION_ERRORS as exc:
        raise ConnectionLost(name, type(exc).__name__) from None
    if not isinstance(confirmation, Basic.Ack):
        # A nack, a reject or no frame at all (a channel without confirms) is never success.
        raise RefusedError(name, type(confirmation).__name__)
