from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from tests.support import Broker, delete_quorum_queues, test_broker

# The queue types every promise is tested on (CONTRACT: "every feature works on both").
QUEUE_TYPES = ("classic", "quorum")


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """A real RabbitMQ and a vhost of this test run's own."""
    with test_broker() as b:
        yield b


@pytest.fixture
def registry() -> CollectorRegistry:
    """A fresh metrics registry per test."""
    return CollectorRegistry()


@pytest.fixture(params=QUEUE_TYPES)
def queue_type(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run the test once per queue type, ids ``classic`` and ``quorum``.

    It sets ``LEVERET_QUEUE_TYPE`` for the test's duration, the one switch a deployment uses, so
    everything that reads settings sees it the same way: ``WorkerSettings`` built in the test
    (``broker.settings()``, a fault app's ``declare()``), and worker subprocesses, which inherit
    the environment. The test bodies stay the same for both types.
    """
    value: str = request.param
    monkeypatch.setenv("LEVERET_QUEUE_TYPE", value)
    yield value
    if value == "quorum" and "broker" in request.fixturenames:
        delete_quorum_queues(request.getfixturevalue("broker"))
