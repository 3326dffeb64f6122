"""The one error root every Leveret package raises from.

Tree::

    LeveretError
    ├── InvalidValueError (ValueError)   a value the caller passed cannot be used
    │   ├── InvalidNameError             a job, queue or exchange name would break routing
    │   ├── InvalidDelayError            a delay below 0 or beyond MAX_DELAY_S
    │   ├── producers.InvalidPriorityError   a priority outside 0..9
    │   ├── producers.InvalidMaxAttemptsError   a per-publish max_attempts below 1
    │   ├── producers.InvalidPayloadError (TypeError)   a payload that is not a dict or model
    │   ├── producers.DuplicateJobIdError    one id twice in a publish_many batch
    │   ├── producers.InvalidMessageError (also PublishError)   a property or header AMQP
    │   │                                    cannot carry (too long, no AMQP type)
    │   ├── producers.events.InvalidEvent    a lifecycle event body this version cannot read
    │   ├── producers.dedup.InvalidDedupKeyError   an empty, too long or non-text dedup_key
    │   └── consumer.ops.dlq.InvalidDurationError   a --older-than that is not a duration
    ├── TopologyError                    the broker layout cannot be applied or is invalid
    │   └── QueueMismatchError           an existing queue has other arguments than wanted
    ├── producers.BrokerUnavailable (ConnectionError)   cannot connect to the broker
    ├── producers.PublishError           a job could not be safely handed to the broker
    │   ├── producers.UnroutableError    no queue is bound for the job
    │   ├── producers.RefusedError       the broker nacked the job
    │   ├── producers.PublishTimeout (TimeoutError)   no confirm in time (blocked broker)
    │   ├── producers.ConnectionLost (ConnectionError)   the connection failed mid-publish
    │   └── producers.batch.BatchPublishError   jobs of a batch not confirmed, each named
    ├── producers.status.StatusStoreError    the Redis job-status store refused for good
    │   ├── producers.status.StatusStoreUnavailable (ConnectionError)   unreachable for now
    │   ├── producers.dedup.DedupUnavailableError   dedup_key given, but no status store
    │   ├── producers.groups.GroupsUnavailableError   a group, but no status store
    │   └── producers.schedules.SchedulesUnavailableError   a runtime schedule, no store
    ├── producers.status.JobFailed       a job awaited by its status ended dead
    ├── producers.status.JobCancelled    a job awaited by its status was cancelled
    ├── producers.cancel.UnknownJob (LookupError)   no status for this id (never, or expired)
    ├── producers.cancel.JobAlreadyEnded   nothing left to cancel: the job has ended
    ├── producers.eventloop.LoopUnavailable   the --loop asked for is unknown or not installed
    ├── consumer.ConfigError (ValueError)   a worker application or setting is unusable
    ├── consumer.ops.management.ManagementError   the management API cannot be used
    ├── consumer.ops.status.StatusUnavailable   no management API and no app to probe
    ├── consumer.ops.dlq.DlqError        a DLQ operation cannot run
    ├── consumer.history.store.InvalidQuery (ValueError)   a listing filter or cursor is unusable
    └── consumer.history.store.HistoryUnavailable   the history's PostgreSQL cannot be used
        └── consumer.history.writer.SchemaBehind   its schema lacks a migration (run migrate)

The builtin second bases are there so that code written against the builtins (``except
ValueError``, ``except TimeoutError``) keeps working; Leveret's own callers (the CLI) catch
``LeveretError`` and never a builtin, and nothing parses an exception's text: what a caller may
act on sits in attributes. Messages say what to do next.
"""

from __future__ import annotations


class LeveretError(Exception):
    """Root of every error Leveret raises on purpose."""


class InvalidValueError(LeveretError, ValueError):
    """A value the caller passed cannot be used; the message says what would be accepted.

    A ``ValueError`` too, so pydantic validators that call Leveret's checks still turn it into
    a ``ValidationError``, and ``except ValueError`` written before the tree keeps working.
    """


class InvalidNameError(InvalidValueError):
    """A job, queue or exchange name that would break routing keys or collide with Leveret's."""

    def __init__(self, kind: str, name: str, message: str) -> None:
        self.kind = kind
        self.name = name
        super().__init__(message)


class InvalidDelayError(InvalidValueError):
    """A delay below zero, not a number, or longer than the delay chain can express."""

    def __init__(self, delay_s: float, message: str) -> None:
        self.delay_s = delay_s
        super().__init__(message)


class TopologyError(LeveretError):
    """The broker layout is invalid or could not be declared."""


class QueueMismatchError(TopologyError):
    """A queue already exists on the broker with arguments that differ from the topology.

    RabbitMQ refuses to redeclare a queue with other arguments and closes the channel with a bare
    ``PRECONDITION_FAILED``; this error names the queue and the argument instead.
    """

    def __init__(self, queue: str, argument: str, existing: object, wanted: object) -> None:
        self.queue = queue
        self.argument = argument
        self.existing = existing
        self.wanted = wanted
        super().__init__(
            f"queue {queue!r} already exists with {argument}={existing!r}, but the topology "
            f"wants {argument}={wanted!r}; delete the queue (after draining it) or change the "
            f"topology to match"
        )
