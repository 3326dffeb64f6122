from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from tests.support import Broker, test_broker


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """A real RabbitMQ and a vhost of this test run's own."""
    with test_broker() as b:
        yield b


@pytest.fixture
def registry() -> CollectorRegistry:
    """A fresh metrics registry per test."""
    return CollectorRegistry()
