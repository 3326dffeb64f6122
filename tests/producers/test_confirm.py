"""publish_confirmed: the one confirmed publish; each way it can fail is its own typed error."""

from __future__ import annotations

import aiormq.abc
import pytest
from aio_pika.abc import AbstractConnection
from pamqp.commands import Basic

from leveret.producers.broker.confirm import publish_confirmed
from leveret.producers.errors import (
    ConnectionLost,
    PublishError,
    PublishTimeout,
    RefusedError,
    UnroutableError,
)
from leveret.producers.wire.message import job_properties
from tests.support import Broker, unique


async def _confirming(connection: AbstractConnection) -> aiormq.abc.AbstractChannel:
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    return await channel.get_underlay_channel()


async def _queue(connection: AbstractConnection) -> str:
    name = unique("confirm")
    channel = await connection.channel()
    await channel.declare_queue(name, auto_delete=True)
    return name


async def test_a_confirmed_publish_is_in_the_queue(broker: Broker, connection) -> None:
    queue = await _queue(connection)
    channel = await _confirming(connection)
    await publish_confirmed(channel, b"{}", exchange="", routing_key=queue,
                            properties=job_properties("j", "id-1"), timeout=5)  # fmt: skip
    assert await broker.depth(queue) == 1


async def test_no_queue_is_unroutable_named_after_the_message_type(connection) -> None:
    channel = await _confirming(connection)
    with pytest.raises(UnroutableError) as caught:
        await publish_confirmed(channel, b"{}", exchange="", routing_key=unique("nobody"),
                                properties=job_properties("resize", "id-2"), timeout=5)  # fmt: skip
    assert caught.value.job == "resize"
    assert isinstance(caught.value, PublishError)


async def test_a_missing_exchange_says_to_declare(connection) -> None:
    channel = await _confirming(connection)
    with pytest.raises(PublishError, match="topology declare"):
        await publish_confirmed(channel, b"{}", exchange=unique("noex"), routing_key="k",
                                properties=Basic.Properties(), timeout=5, job="j")  # fmt: skip


async def test_no_confirm_in_time_is_a_publish_timeout(connection) -> None:
    queue = await _queue(connection)
    channel = await _confirming(connection)
    with pytest.raises(PublishTimeout) as caught:
        await publish_confirmed(channel, b"{}", exchange="", routing_key=queue,
                                properties=Basic.Properties(), timeout=0, job="j")  # fmt: skip
    assert isinstance(caught.value, TimeoutError) and caught.value.timeout_s == 0


async def test_a_channel_without_confirms_is_never_success(connection) -> None:
    """No confirm frame at all is not an ack: the caller would report a guess as a fact."""
    queue = await _queue(connection)
    plain = await (await connection.channel(publisher_confirms=False)).get_underlay_channel()
    with pytest.raises(RefusedError):
        await publish_confirmed(plain, b"{}", exchange="", routing_key=queue,
                                properties=Basic.Properties(), timeout=5, job="j")  # fmt: skip


async def test_a_closed_channel_is_connection_lost(connection) -> None:
    channel = await _confirming(connection)
    await channel.close()
    with pytest.raises(ConnectionLost) as caught:
        await publish_confirmed(channel, b"{}", exchange="", routing_key="q",
                                properties=Basic.Properties(), timeout=5, job="j")  # fmt: skip
    assert isinstance(caught.value, ConnectionError)  # reconnect loops treat it as one
    assert "may not have been queued" in str(caught.value)
