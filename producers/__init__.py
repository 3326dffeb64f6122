"""The publisher library: submit jobs that are either confirmed in a queue or an error.

What the worker shares with it lives in three subpackages, each public through its
``__all__``: ``wire`` (the envelope and lifecycle events), ``stores`` (Redis-backed statuses,
dedup claims, cancel marks), ``broker`` (the connection and the one confirmed-publish path).
``leveret.consumer`` imports from these and from the names below, nothing deeper.
"""

from leveret.producers.blocking import BlockingPublisher
from leveret.producers.broker.connection import mask_url
from leveret.producers.errors import (
    BrokerUnavailable,
    ConnectionLost,
    DuplicateJobIdError,
    InvalidMessageError,
    InvalidPayloadError,
    InvalidPriorityError,
    PublishError,
    PublishTimeout,
    RefusedError,
    UnroutableError,
)
from leveret.producers.eventloop import LOOP_CHOICES, LoopUnavailable, loop_name
from leveret.producers.eventloop import install as install_loop
from leveret.producers.eventloop import resolve as resolve_loop
from leveret.producers.groups import (
    HEADER_GROUP,
    HEADER_GROUP_THEN,
    GroupId,
    GroupMember,
    GroupStatus,
    GroupStore,
    GroupsUnavailableError,
    JobGroup,
    ThenJob,
    new_group_id,
    then_id,
)
from leveret.producers.metrics import built_on, per_registry, published_counter
from leveret.producers.publisher import Job, Publisher, delay_seconds, prepare_job
from leveret.producers.schedules import (
    RuntimeSchedule,
    ScheduleStore,
    SchedulesUnavailableError,
    build_schedule,
    runtime_schedules,
)
from leveret.producers.settings import DEFAULT_PUBLISH_TIMEOUT, ConnectionSettings

__all__ = [
    "DEFAULT_PUBLISH_TIMEOUT",
    "HEADER_GROUP",
    "HEADER_GROUP_THEN",
    "LOOP_CHOICES",
    "BlockingPublisher",
    "BrokerUnavailable",
    "ConnectionLost",
    "ConnectionSettings",
    "DuplicateJobIdError",
    "GroupId",
    "GroupMember",
    "GroupStatus",
    "GroupStore",
    "GroupsUnavailableError",
    "InvalidMessageError",
    "InvalidPayloadError",
    "InvalidPriorityError",
    "Job",
    "JobGroup",
    "LoopUnavailable",
    "PublishError",
    "PublishTimeout",
    "Publisher",
    "RefusedError",
    "RuntimeSchedule",
    "ScheduleStore",
    "SchedulesUnavailableError",
    "ThenJob",
    "UnroutableError",
    "build_schedule",
    "built_on",
    "delay_seconds",
    "install_loop",
    "loop_name",
    "mask_url",
    "new_group_id",
    "per_registry",
    "prepare_job",
    "published_counter",
    "resolve_loop",
    "runtime_schedules",
    "then_id",
]
