"""The publisher library: submit jobs that are either confirmed in a queue or an error."""

from leveret.producers.blocking import BlockingPublisher
from leveret.producers.broker.connection import mask_url
from leveret.producers.errors import (
    BrokerUnavailable,
    ConnectionLost,
    DuplicateJobIdError,
    InvalidPayloadError,
    InvalidPriorityError,
    PublishError,
    PublishTimeout,
    RefusedError,
    UnroutableError,
)
from leveret.producers.publisher import Job, Publisher
from leveret.producers.settings import ConnectionSettings

__all__ = [
    "BlockingPublisher",
    "BrokerUnavailable",
    "ConnectionLost",
    "ConnectionSettings",
    "DuplicateJobIdError",
    "InvalidPayloadError",
    "InvalidPriorityError",
    "Job",
    "PublishError",
    "PublishTimeout",
    "Publisher",
    "RefusedError",
    "UnroutableError",
    "mask_url",
]
