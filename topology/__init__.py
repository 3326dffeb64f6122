"""The broker layout as data: exchanges, work queues, DLQs and the shared delay chain."""

from leveret.topology.declare import declare, declare_url
from leveret.topology.definitions import to_definitions
from leveret.topology.delay import (
    DELAY_BITS,
    DELAY_UNIT_S,
    MAX_DELAY_S,
    delay_levels,
    delay_queue_name,
    delay_queue_names,
    delayed_job_route,
    retry_queue_name,
    retry_route,
    retry_ttl_ms,
)
from leveret.topology.errors import (
    InvalidDelayError,
    InvalidNameError,
    InvalidValueError,
    LeveretError,
    QueueMismatchError,
    TopologyError,
)
from leveret.topology.model import Topology, WorkQueue, dlq_name

__all__ = [
    "DELAY_BITS",
    "DELAY_UNIT_S",
    "MAX_DELAY_S",
    "InvalidDelayError",
    "InvalidNameError",
    "InvalidValueError",
    "LeveretError",
    "QueueMismatchError",
    "Topology",
    "TopologyError",
    "WorkQueue",
    "declare",
    "declare_url",
    "delay_levels",
    "delay_queue_name",
    "delay_queue_names",
    "delayed_job_route",
    "dlq_name",
    "retry_queue_name",
    "retry_route",
    "retry_ttl_ms",
    "to_definitions",
]
