"""Leveret: background jobs for Python services on RabbitMQ.

``import leveret`` is the public API. The three parts live in their own subpackages and import
one way only: ``leveret.topology`` (the broker layout) ← ``leveret.producers`` (publishing) ←
``leveret.consumer`` (the worker runtime and its CLI).
"""

from leveret.consumer import ConfigError, JobContext, Reject, Worker, WorkerSettings
from leveret.producers import (
    BlockingPublisher,
    BrokerUnavailable,
    ConnectionLost,
    DuplicateJobIdError,
    InvalidPayloadError,
    InvalidPriorityError,
    Publisher,
    PublishError,
    PublishTimeout,
    RefusedError,
    UnroutableError,
)
from leveret.topology import (
    InvalidDelayError,
    InvalidNameError,
    InvalidValueError,
    LeveretError,
    QueueMismatchError,
    TopologyError,
)

__all__ = [
    "BlockingPublisher",
    "BrokerUnavailable",
    "ConfigError",
    "ConnectionLost",
    "DuplicateJobIdError",
    "InvalidDelayError",
    "InvalidNameError",
    "InvalidPayloadError",
    "InvalidPriorityError",
    "InvalidValueError",
    "JobContext",
    "LeveretError",
    "PublishError",
    "PublishTimeout",
    "Publisher",
    "QueueMismatchError",
    "RefusedError",
    "Reject",
    "TopologyError",
    "UnroutableError",
    "Worker",
    "WorkerSettings",
]
