"""Leveret: background jobs for Python services on RabbitMQ.

``import leveret`` is the public API. The three parts live in their own subpackages and import
one way only: ``leveret.topology`` (the broker layout) ← ``leveret.producers`` (publishing) ←
``leveret.consumer`` (the worker runtime and its CLI).

The names below are loaded on first use (PEP 562 ``__getattr__``), not when ``leveret`` is
imported: importing any submodule runs this file first, so eager imports here would make a
publisher-only service (``leveret.producers``) load the whole worker runtime too.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from leveret.consumer import ConfigError, JobContext, Reject, Worker, WorkerSettings
    from leveret.consumer.errors import Retry
    from leveret.producers import (
        BlockingPublisher,
        BrokerUnavailable,
        ConnectionLost,
        DuplicateJobIdError,
        GroupStatus,
        GroupsUnavailableError,
        InvalidPayloadError,
        InvalidPriorityError,
        Job,
        JobGroup,
        Publisher,
        PublishError,
        PublishTimeout,
        RefusedError,
        RuntimeSchedule,
        SchedulesUnavailableError,
        UnroutableError,
    )
    from leveret.producers.stores import (
        DedupUnavailableError,
        JobAlreadyEnded,
        JobCancelled,
        JobFailed,
        JobStatus,
        StatusStoreUnavailable,
        UnknownJob,
    )
    from leveret.topology import (
        InvalidDelayError,
        InvalidNameError,
        InvalidValueError,
        LeveretError,
        QueueMismatchError,
        TopologyError,
    )

# Where each public name lives; ``__getattr__`` imports it from there the first time it is read.
_HOME = {
    "Retry": "leveret.consumer.errors",
    "Job": "leveret.producers",
    "JobFailed": "leveret.producers.stores",
    "JobCancelled": "leveret.producers.stores",
    "JobStatus": "leveret.producers.stores",
    "JobAlreadyEnded": "leveret.producers.stores",
    "UnknownJob": "leveret.producers.stores",
    "StatusStoreUnavailable": "leveret.producers.stores",
    "DedupUnavailableError": "leveret.producers.stores",
    **dict.fromkeys(
        ("ConfigError", "JobContext", "Reject", "Worker", "WorkerSettings"), "leveret.consumer"
    ),
    **dict.fromkeys(
        (
            "BlockingPublisher",
            "BrokerUnavailable",
            "ConnectionLost",
            "DuplicateJobIdError",
            "GroupStatus",
            "GroupsUnavailableError",
            "JobGroup",
            "RuntimeSchedule",
            "SchedulesUnavailableError",
            "InvalidPayloadError",
            "InvalidPriorityError",
            "PublishError",
            "PublishTimeout",
            "Publisher",
            "RefusedError",
            "UnroutableError",
        ),
        "leveret.producers",
    ),
    **dict.fromkeys(
        (
            "InvalidDelayError",
            "InvalidNameError",
            "InvalidValueError",
            "LeveretError",
            "QueueMismatchError",
            "TopologyError",
        ),
        "leveret.topology",
    ),
}
_SUBPACKAGES = ("consumer", "producers", "testing", "topology")

__all__ = [
    "BlockingPublisher",
    "BrokerUnavailable",
    "ConfigError",
    "ConnectionLost",
    "DedupUnavailableError",
    "DuplicateJobIdError",
    "GroupStatus",
    "GroupsUnavailableError",
    "InvalidDelayError",
    "InvalidNameError",
    "InvalidPayloadError",
    "InvalidPriorityError",
    "InvalidValueError",
    "Job",
    "JobAlreadyEnded",
    "JobCancelled",
    "JobContext",
    "JobFailed",
    "JobGroup",
    "JobStatus",
    "LeveretError",
    "PublishError",
    "PublishTimeout",
    "Publisher",
    "QueueMismatchError",
    "RefusedError",
    "Reject",
    "Retry",
    "RuntimeSchedule",
    "SchedulesUnavailableError",
    "StatusStoreUnavailable",
    "TopologyError",
    "UnknownJob",
    "UnroutableError",
    "Worker",
    "WorkerSettings",
]


def __getattr__(name: str) -> object:
    home = _HOME.get(name)
    if home is not None:
        value = getattr(importlib.import_module(home), name)
        globals()[name] = value  # once: later reads are plain attribute lookups
        return value
    if name in _SUBPACKAGES:  # `import leveret; leveret.consumer.…` as before
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
