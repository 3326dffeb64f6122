"""The one error root every Leveret package raises from.

Tree::

    LeveretError
    ├── TopologyError           the broker layout cannot be applied or is invalid
    │   └── QueueMismatchError  an existing queue has other arguments than the topology wants
    ├── producers.PublishError  a job could not be safely handed to the broker
    │   ├── producers.UnroutableError   no queue is bound for the job
    │   ├── producers.RefusedError      the broker nacked the job
    │   └── producers.PublishTimeout    no confirm in time (blocked broker, lost connection)
    └── consumer.ConfigError    a worker application or setting is unusable

Messages say what to do next; data a caller may act on sits in attributes.
"""

from __future__ import annotations


class LeveretError(Exception):
    """Root of every error Leveret raises on purpose."""


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
