"""``Delivery``: one delivered message, its envelope parsed once, read by every later step.

Everything the pipeline, the redelivery guard and settle need about the message travels in
this one object instead of eight positional arguments: the delivery's tag and queue, the job's
resolved name and id (a message without ``message_id`` gets a fresh one here, so every copy
of it names the same job), the attempts already made, the broker's redelivered flag and, when
the envelope is malformed, why it cannot run (``problem``; see ``read_envelope``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import cast

import aiormq.abc
from pamqp.commands import Basic

from leveret.producers.wire import read_envelope


@dataclass(slots=True, eq=False)
class Delivery:
    message: aiormq.abc.DeliveredMessage
    queue: str
    tag: int
    name: str
    job_id: str
    id_assigned: bool  # the message came without message_id; job_id is new
    attempts: int  # runs already made (``x-attempts``)
    redelivered: bool
    problem: str | None  # why the envelope is invalid, or None
    max_attempts: int | None  # ``x-max-attempts`` (publish's own limit), else the registered one

    @classmethod
    def read(cls, message: aiormq.abc.DeliveredMessage, queue: str, max_body: int) -> Delivery:
        # Consumed messages carry a basic.deliver (the union also covers get/return frames).
        deliver = cast(Basic.Deliver, message.delivery)
        envelope = read_envelope(
            message.header.properties, deliver.routing_key, len(message.body), max_body
        )
        job_id = envelope.job_id
        return cls(
            message=message,
            queue=queue,
            tag=cast(int, deliver.delivery_tag),
            name=envelope.name,
            job_id=job_id or str(uuid.uuid4()),
            id_assigned=job_id is None,
            attempts=envelope.attempts,
            redelivered=bool(deliver.redelivered),
            problem=envelope.problem,
            max_attempts=envelope.max_attempts,
        )

    @property
    def properties(self) -> Basic.Properties:
        return self.message.header.properties
