"""The broker layout as data: exchanges, queues and bindings, declared and exported alike.

Every name an operator sees comes from a pure function (``dlq_name`` here; the delay chain's
``retry_queue_name``, ``delay_exchange_name`` and routes in ``topology.delay``), so the worker,
the publisher, the CLI and the exported definitions can never disagree about them.

Queues for a work queue ``Q``:

* ``Q``: durable; ``x-max-priority`` (classic) so higher-priority jobs run first; its own
  dead-letter route points at ``Q.dlq`` so a message the broker itself drops (a policy
  ``max-length``, a quorum ``delivery-limit``) is kept there rather than lost.
* ``Q.retry.<ttl>``: the 27 TTL queues of the delay chain (``topology.delay``).
* ``Q.dlq``: durable, no TTL; the worker publishes dead jobs there with confirms.

``queue_type="quorum"`` switches all three kinds to replicated quorum queues. RabbitMQ 3.x quorum
queues have no priorities, so ``x-max-priority`` is left out; they gain ``x-delivery-limit``,
which the broker enforces, and at-least-once dead-lettering for the retry queues.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .delay import (
    BIT_CLEAR,
    BIT_SET,
    DELAY_BITS,
    MAX_ROUTING_KEY,
    _level_pattern,
    delay_exchange_name,
    retry_queue_name,
    retry_ttl_ms,
)
from .errors import InvalidNameError

DEFAULT_MAX_PRIORITY = 10
QUORUM_DELIVERY_LIMIT = 20

# Words of a topic routing key: no '*', '#' or empty words, so a name is matched literally.
_NAME = re.compile(r"^[A-Za-z0-9_:-]+(\.[A-Za-z0-9_:-]+)*$")
# 255 bytes of routing key - 27 bit words of 2 bytes - "j." = 199 (see the module docstring).
_MAX_NAME = MAX_ROUTING_KEY - 2 * DELAY_BITS - 2

QueueType = Literal["classic", "quorum"]


def check_name(kind: str, name: str) -> str:
    """Refuse names that would break routing keys or collide with derived queue names."""
    if not _NAME.match(name) or len(name) > _MAX_NAME:
        raise InvalidNameError(
            kind,
            name,
            f"{kind} name {name!r} is not valid: use letters, digits, '_', '-', ':' and "
            f"dot-separated words, at most {_MAX_NAME} characters",
        )
    return name


def dlq_name(queue: str) -> str:
    return f"{queue}.dlq"


def events_exchange_name(exchange: str) -> str:
    """The topic exchange lifecycle events go to, named after the jobs exchange:
    ``jobs`` → ``jobs.events`` (routing key ``<job>.<state>``; see ``producers.events``)."""
    return f"{exchange}.events"


def cancel_exchange_name(exchange: str) -> str:
    """The fanout exchange cancellations are broadcast on: ``jobs`` → ``jobs.cancel`` (every
    running worker binds a queue of its own; see ``producers.cancel``)."""
    return f"{exchange}.cancel"


@dataclass(frozen=True, slots=True)
class ExchangeDecl:
    name: str
    type: str
    durable: bool = True


@dataclass(frozen=True, slots=True)
class QueueDecl:
    name: str
    arguments: dict[str, Any]
    durable: bool = True


@dataclass(frozen=True, slots=True)
class BindingDecl:
    source: str
    destination: str
    routing_key: str
    destination_type: Literal["queue", "exchange"] = "queue"


class WorkQueue(BaseModel):
    """One work queue and the job names routed to it."""

    model_config = ConfigDict(frozen=True)

    name: str
    jobs: tuple[str, ...] = ()
    max_priority: int = Field(default=DEFAULT_MAX_PRIORITY, ge=1, le=255)
    queue_type: QueueType = "classic"

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        check_name("queue", name)
        if name.endswith(".dlq") or ".retry." in name:
            raise InvalidNameError(
                "queue", name, f"queue name {name!r} collides with Leveret's derived queue names"
            )
        return name

    @field_validator("jobs")
    @classmethod
    def _valid_jobs(cls, jobs: tuple[str, ...]) -> tuple[str, ...]:
        for job in jobs:
            check_name("job", job)
        return tuple(sorted(set(jobs)))

    @property
    def dlq(self) -> str:
        return dlq_name(self.name)

    @property
    def retry_queues(self) -> list[str]:
        return [retry_queue_name(self.name, n) for n in range(DELAY_BITS)]

    def _type_args(self) -> dict[str, Any]:
        return {"x-queue-type": "quorum"} if self.queue_type == "quorum" else {}

    def work_arguments(self) -> dict[str, Any]:
        args: dict[str, Any] = {
            **self._type_args(),
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.dlq,
        }
        if self.queue_type == "classic":
            args["x-max-priority"] = self.max_priority
        else:
            args["x-delivery-limit"] = QUORUM_DELIVERY_LIMIT
        return args

    def retry_arguments(self, exchange: str, level: int) -> dict[str, Any]:
        args: dict[str, Any] = {
            **self._type_args(),
            "x-message-ttl": retry_ttl_ms(level),
            "x-dead-letter-exchange": delay_exchange_name(exchange, level - 1),
        }
        if self.queue_type == "quorum":
            args["x-dead-letter-strategy"] = "at-least-once"
            args["x-overflow"] = "reject-publish"
        return args

    def dlq_arguments(self) -> dict[str, Any]:
        return self._type_args()


class Topology(BaseModel):
    """Everything Leveret declares on a broker for one application."""

    model_config = ConfigDict(frozen=True)

    exchange: str = "jobs"
    queues: tuple[WorkQueue, ...] = ()

    @field_validator("exchange")
    @classmethod
    def _valid_exchange(cls, name: str) -> str:
        return check_name("exchange", name)

    @field_validator("queues")
    @classmethod
    def _unique_queues(cls, queues: tuple[WorkQueue, ...]) -> tuple[WorkQueue, ...]:
        names = [q.name for q in queues]
        if len(set(names)) != len(names):
            duplicate = next(n for n in names if names.count(n) > 1)
            raise InvalidNameError(
                "queue", duplicate, f"work queues must have unique names, got {names}"
            )
        return tuple(sorted(queues, key=lambda q: q.name))

    def queue(self, name: str) -> WorkQueue:
        for q in self.queues:
            if q.name == name:
                return q
        known = ", ".join(q.name for q in self.queues) or "none"
        raise KeyError(f"no work queue {name!r} in this topology (known: {known})")

    def exchanges(self) -> list[ExchangeDecl]:
        chain = [
            ExchangeDecl(delay_exchange_name(self.exchange, n), "topic")
            for n in range(DELAY_BITS - 1, -2, -1)
        ]
        # The events exchange is declared with the rest, so a subscriber (or the status keeper)
        # may bind to it before any worker ran, and a worker's first event is never unroutable.
        events = ExchangeDecl(events_exchange_name(self.exchange), "topic")
        # Declared up front too: a cancel broadcast to a missing exchange would close the
        # publisher's channel (404), not just reach nobody.
        cancel = ExchangeDecl(cancel_exchange_name(self.exchange), "fanout")
        return [ExchangeDecl(self.exchange, "direct"), *chain, events, cancel]

    def queue_decls(self) -> list[QueueDecl]:
        decls: list[QueueDecl] = []
        for q in self.queues:
            decls.append(QueueDecl(q.name, q.work_arguments()))
            decls.extend(
                QueueDecl(retry_queue_name(q.name, n), q.retry_arguments(self.exchange, n))
                for n in range(DELAY_BITS)
            )
            decls.append(QueueDecl(q.dlq, q.dlq_arguments()))
        return decls

    def bindings(self) -> list[BindingDecl]:
        ex = self.exchange
        out: list[BindingDecl] = [
            # Bit n is 0: skip this level and let the next exchange down decide.
            BindingDecl(
                delay_exchange_name(ex, n),
                delay_exchange_name(ex, n - 1),
                _level_pattern(n, BIT_CLEAR, "#"),
                "exchange",
            )
            for n in range(DELAY_BITS - 1, -1, -1)
        ]
        arrived = ".".join(["*"] * DELAY_BITS)
        for q in self.queues:
            addresses = [f"q.{q.name}", *(f"j.{job}" for job in q.jobs)]
            out.extend(BindingDecl(ex, q.name, job) for job in q.jobs)
            for n in range(DELAY_BITS - 1, -1, -1):
                out.extend(
                    BindingDecl(
                        delay_exchange_name(ex, n),
                        retry_queue_name(q.name, n),
                        _level_pattern(n, BIT_SET, addr),
                    )
                    for addr in addresses
                )
            out.extend(
                BindingDecl(delay_exchange_name(ex, -1), q.name, f"{arrived}.{addr}")
                for addr in addresses
            )
        return out
