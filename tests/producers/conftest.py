"""Shared fixtures of the publisher-side tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection

from tests.support import Broker


@pytest.fixture
async def connection(broker: Broker) -> AsyncIterator[AbstractConnection]:
    """A plain aio-pika connection to the test's vhost, closed after the test."""
    connection = await aio_pika.connect(broker.url)
    try:
        yield connection
    finally:
        await connection.close()
