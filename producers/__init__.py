"""The publisher library: submit jobs that are either confirmed in a queue or an error."""

from .blocking import BlockingPublisher
from .connection import mask_url
from .errors import (
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
from .publisher import Job, Publisher
from .settings import ConnectionSettings

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
