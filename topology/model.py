"""The broker layout as data: exchanges, queues and bindings, declared and exported alike.

Every name an operator sees comes from a pure function (``dlq_name`` here; the delay chain's
``delay_queue_name``, ``delay_exchange_name`` and routes in ``topology.delay``), so the worker,
the publisher, the CLI and the exported definitions can never disagree about them.

Queues for a work queue ``Q``:

* ``Q``: durable; ``x-max-priority`` (classic) so higher-priority jobs run first; its own
  dead-letter route points at ``Q.dlq`` so a message the broker itself drops (a policy
  ``max-length``, a quorum ``delivery-limit``) is kept there rather than lost.
* ``Q.dlq``: durable, no TTL; the worker publishes dead jobs there with confirms.

And for the exchange, shared by every work queue: the 27 TTL queues of the delay chain,
``<exchange>.delay.<ttl>`` (``topology.delay``), however many work queues there are.

``queue_type="quorum"`` switches a work queue and its DLQ to replicated quorum queues, and the
delay queues too when any work queue is quorum (``Topology.delay_queue_type``). RabbitMQ 3.x
quorum queues have no priorities, so ``x-max-priority`` is left out; they gain
``x-delivery-limit``, which the broker enforces, and the delay queues at-least-once
dead-lettering.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from leveret.topology.delay import (
    BIT_CLEAR,
    BIT_SET,
    DELAY_BITS,
    MAX_ROUTING_KEY,
    _level_pattern,
    delay_exchange_name,
    delay_queue_name,
    delay_queue_prefix,
    retry_queue_name,
    retry_ttl_ms,
    v2_exchange_name,
)
from leveret.topology.errors import InvalidNameError

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
    def v2_retry_queues(self) -> list[str]:
        """The v2 layout's per-queue retry queues, ``Q.retry.<ttl>``: only ever drained now."""
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

    @model_validator(mode="after")
    def _no_delay_names(self) -> Topology:
        prefix = delay_queue_prefix(self.exchange)
        for q in self.queues:
            if q.name.startswith(prefix):
                raise InvalidNameError(
                    "queue",
                    q.name,
                    f"queue name {q.name!r} collides with the delay chain's queues ({prefix}…)",
                )
        return self

    @property
    def delay_queue_type(self) -> QueueType:
        """Quorum when any work queue is: a replicated job must not wait in a single node."""
        return "quorum" if any(q.queue_type == "quorum" for q in self.queues) else "classic"

    def delay_arguments(self, level: int, queue_type: QueueType | None = None) -> dict[str, Any]:
        """The shared delay queue of bit ``level``: its TTL, and the next exchange down.

        ``queue_type`` defaults to ``delay_queue_type``; ``declare`` accepts a chain that
        already exists as the other type (the first app to declare it on the vhost chose).
        """
        args: dict[str, Any] = {
            "x-message-ttl": retry_ttl_ms(level),
            "x-dead-letter-exchange": delay_exchange_name(self.exchange, level - 1),
        }
        if (queue_type or self.delay_queue_type) == "quorum":
            args = {"x-queue-type": "quorum", **args}
            args["x-dead-letter-strategy"] = "at-least-once"
            args["x-overflow"] = "reject-publish"
        return args

    def delay_queues(self, queue_type: QueueType | None = None) -> list[QueueDecl]:
        return [
            QueueDecl(delay_queue_name(self.exchange, n), self.delay_arguments(n, queue_type))
            for n in range(DELAY_BITS)
        ]

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
        # The v2 chain exchanges: v2 retry queues dead-letter into them, and a v2 publisher
        # still publishes to them; each forwards everything to the v3 exchange of its bit.
        v2 = [
            ExchangeDecl(v2_exchange_name(self.exchange, n), "topic")
            for n in range(DELAY_BITS - 1, -1, -1)
        ]
        # The events exchange is declared with the rest, so a subscriber (or the history writer)
        # may bind to it before any worker ran, and a worker's first event is never unroutable.
        events = ExchangeDecl(events_exchange_name(self.exchange), "topic")
        # Declared up front too: a cancel broadcast to a missing exchange would close the
        # publisher's channel (404), not just reach nobody.
        cancel = ExchangeDecl(cancel_exchange_name(self.exchange), "fanout")
        return [ExchangeDecl(self.exchange, "direct"), *chain, *v2, events, cancel]

    def queue_decls(self) -> list[QueueDecl]:
        decls: list[QueueDecl] = []
        for q in self.queues:
            decls.append(QueueDecl(q.name, q.work_arguments()))
            decls.append(QueueDecl(q.dlq, q.dlq_arguments()))
        return [*decls, *self.delay_queues()]

    def bindings(self) -> list[BindingDecl]:
        """Every binding of the layout, the v2 forwards included (``v2_forward``)."""
        forwards = [self.v2_forward(n) for n in range(DELAY_BITS - 1, -1, -1)]
        return [*self.core_bindings(), *forwards]

    def v2_forward(self, level: int) -> BindingDecl:
        """The v2 exchange of bit ``level`` forwards everything to the v3 one: what a v2 retry
        queue dead-letters, or a v2 publisher sends, continues in the shared chain."""
        ex = self.exchange
        return BindingDecl(
            v2_exchange_name(ex, level), delay_exchange_name(ex, level), "#", "exchange"
        )

    def core_bindings(self) -> list[BindingDecl]:
        """The bindings of the v3 chain, the jobs exchange and ``….delay.done``."""
        ex = self.exchange
        out: list[BindingDecl] = []
        for n in range(DELAY_BITS - 1, -1, -1):
            # Bit n is 1: wait in the delay queue of bit n, whatever the destination.
            out.append(
                BindingDecl(
                    delay_exchange_name(ex, n),
                    delay_queue_name(ex, n),
                    _level_pattern(n, BIT_SET, "#"),
                )
            )
            # Bit n is 0: skip this level and let the next exchange down decide.
            out.append(
                BindingDecl(
                    delay_exchange_name(ex, n),
                    delay_exchange_name(ex, n - 1),
                    _level_pattern(n, BIT_CLEAR, "#"),
                    "exchange",
                )
            )
        arrived = ".".join(["*"] * DELAY_BITS)
        for q in self.queues:
            out.extend(BindingDecl(ex, q.name, job) for job in q.jobs)
            out.extend(
                BindingDecl(delay_exchange_name(ex, -1), q.name, f"{arrived}.{addr}")
                for addr in (f"q.{q.name}", *(f"j.{job}" for job in q.jobs))
            )
        return out

    def v2_skip_binding(self, level: int) -> BindingDecl:
        """The v2 chain's own skip binding at bit ``level``, removed on every declare.

        Beside the ``#`` forward to the v3 exchange it would send a message down both chains
        at once. Removing a binding that is not there is a no-op.
        """
        ex = self.exchange
        return BindingDecl(
            v2_exchange_name(ex, level),
            v2_exchange_name(ex, level - 1),
            _level_pattern(level, BIT_CLEAR, "#"),
            "exchange",
        )

    def v2_retry_bindings(self, queue: WorkQueue, level: int) -> list[BindingDecl]:
        """The v2 bindings into ``Q.retry.<ttl>``, removed where those queues still exist.

        With them, a message passing a v2 exchange would wait in ``Q.retry.<ttl>`` and in the
        shared delay queue (a copy per hop); without them nothing enters a v2 queue any more,
        and what already waits there dead-letters into the v2 exchange one bit down, which
        forwards it to the v3 chain.
        """
        ex = self.exchange
        return [
            BindingDecl(
                v2_exchange_name(ex, level),
                retry_queue_name(queue.name, level),
                _level_pattern(level, BIT_SET, addr),
            )
            for addr in (f"q.{queue.name}", *(f"j.{job}" for job in queue.jobs))
        ]
