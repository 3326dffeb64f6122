"""The broker layout as data, and the delayed-retry design it encodes.

Every name an operator sees comes from a pure function here (``retry_queue_name``,
``dlq_name``, ``delay_exchange_name``), so the worker, the publisher, the CLI and the exported
definitions can never disagree about them.

Delayed retries without plugins
===============================

A message with a *per-message* TTL only expires when it reaches the head of its queue, so one
TTL queue holding mixed delays lets a 1 s retry wait behind a 1 h one. Every retry queue here
therefore has a *queue-level* ``x-message-ttl``: everything in it waits exactly as long, and the
head is always the first to expire.

Delays are counted in units of ``DELAY_UNIT_S`` (250 ms) and written in binary. For each bit ``n``
of ``DELAY_BITS`` (27) there is one retry queue per work queue, ``Q.retry.<ttl>``, whose TTL is
``2**n`` units (``Q.retry.250ms``, ``Q.retry.500ms``, ``Q.retry.1s`` … ``Q.retry.16777216s``). A
delayed message carries its delay in its routing key, most significant bit first, one word per
bit (``+`` for 1, ``=`` for 0), followed by an address: ``=.=.….+.=.+.q.<queue>`` (a retry back
to one work queue) or ``….j.<job>`` (a delayed publish, routed like the ``jobs`` exchange routes
the job name).

It travels down a chain of topic exchanges, one per bit, shared by all work queues of a vhost
(``jobs.delay.16777216s`` … ``jobs.delay.250ms``, then ``jobs.delay.done``), entering at the
exchange of its highest set bit. The exchange for bit
``n`` sends the message into ``Q.retry.<2**n units>`` when that bit is 1, and straight on to the
next exchange when it is 0. A retry queue dead-letters expired messages to the next exchange down
the chain, keeping the routing key, so the message visits exactly the queues of its set bits and
waits the sum of their TTLs: its delay, rounded *up* to the next 250 ms. ``jobs.delay.done``
finally routes it to its work queue by address.

The bound, for any delay from 0 up to ``MAX_DELAY_S`` (2**27 − 1 units, about 388 days, past
the 366 the contract asks for): the TTLs a message waits sum to a value in
[delay, delay + 250 ms) (``tests/topology/test_horizon.py`` proves it by summing the TTLs of the
route for every power-of-two boundary, 0, the maximum and random samples, not by waiting). On
top of that each set bit costs one dead-letter hop; a message visits at most ``DELAY_BITS``
queues, so with ``HOP_ALLOWANCE_S`` (25 ms, measured at a few ms on an idle 3.10 broker) per hop
the lateness is at most 250 ms + 27 × 25 ms = 925 ms: no earlier than due, at most 1 s late at
normal load. Each work queue has exactly 27 retry queues, whatever its backoff, and a delay of 0
(a DLQ replay) takes the same road without waiting anywhere.

Why ``+``/``=`` and not ``1``/``0``, and why names stop at 199 characters. The first layout's
chain had 19 bits (36.4 h) written ``1``/``0``. Redeclaring an existing vhost with more levels
only *adds* queues, exchanges and bindings; the 19-level bindings stay. Their skip pattern
(``*.…0…*.#``) would match a 27-word key whose word happens to be ``0`` at that position and
copy the message down the chain a second time. Bit words that are not ``0``/``1`` and not a
possible name word (names use ``[A-Za-z0-9_:-]``) can match no old binding, and no old key can
match a new one, so both formats coexist on one broker: a message already in flight in the old
format finishes its trip through the old bindings (same queue and exchange names, same
arguments) and arrives; a new one is never copied (``tests/topology/test_legacy_keys.py``). A
routing key is at most 255 bytes: 27 × 2 bytes of bits, ``j.`` and the name leave 199 bytes for
a queue or job name (``_MAX_NAME``). ``delay_address`` reads the address back from a key of
either format.

One constraint follows: a job name should be served by one work queue per vhost. Retries are
addressed to a queue and are unaffected, but a delayed *publish* is addressed to a job name,
and if two queues serve that name, every hop of the chain copies it into both (as the ``jobs``
exchange itself would, once per hop). ``Worker`` cannot register a name twice; two applications
sharing a vhost must not reuse each other's job names; ``leveret doctor`` flags it.

Queues for a work queue ``Q``:

* ``Q``: durable; ``x-max-priority`` (classic) so higher-priority jobs run first; its own
  dead-letter route points at ``Q.dlq`` so a message the broker itself drops (a policy
  ``max-length``, a quorum ``delivery-limit``) is kept there rather than lost.
* ``Q.retry.<ttl>``: the 27 TTL queues above.
* ``Q.dlq``: durable, no TTL; the worker publishes dead jobs there with confirms.

``queue_type="quorum"`` switches all three kinds to replicated quorum queues. RabbitMQ 3.x quorum
queues have no priorities, so ``x-max-priority`` is left out; they gain ``x-delivery-limit``,
which the broker enforces, and at-least-once dead-lettering for the retry queues.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import InvalidDelayError, InvalidNameError

DELAY_UNIT_S = 0.25
DELAY_BITS = 27
MAX_DELAY_S = ((1 << DELAY_BITS) - 1) * DELAY_UNIT_S  # 33_554_431.75 s, about 388 days
# What one dead-letter hop may cost at normal load; DELAY_UNIT_S + DELAY_BITS * HOP_ALLOWANCE_S
# is the promised lateness bound (925 ms, under 1 s).
HOP_ALLOWANCE_S = 0.025
MAX_LATENESS_S = DELAY_UNIT_S + DELAY_BITS * HOP_ALLOWANCE_S
BIT_SET = "+"
BIT_CLEAR = "="
# The first layout: 19 bits written "1"/"0". Only read (``delay_address``), never written.
LEGACY_DELAY_BITS = 19
MAX_ROUTING_KEY = 255
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


def _ttl_label(level: int) -> str:
    ms = int(DELAY_UNIT_S * 1000) << level
    return f"{ms}ms" if ms < 1000 else f"{ms // 1000}s"


def retry_queue_name(queue: str, level: int) -> str:
    return f"{queue}.retry.{_ttl_label(level)}"


def retry_ttl_ms(level: int) -> int:
    return int(DELAY_UNIT_S * 1000) << level


def events_exchange_name(exchange: str) -> str:
    """The topic exchange lifecycle events go to, named after the jobs exchange:
    ``jobs`` → ``jobs.events`` (routing key ``<job>.<state>``; see ``producers.events``)."""
    return f"{exchange}.events"


def cancel_exchange_name(exchange: str) -> str:
    """The fanout exchange cancellations are broadcast on: ``jobs`` → ``jobs.cancel`` (every
    running worker binds a queue of its own; see ``producers.cancel``)."""
    return f"{exchange}.cancel"


def delay_exchange_name(exchange: str, level: int) -> str:
    """The chain exchange that decides bit ``level``; ``-1`` is the final ``….delay.done``."""
    return f"{exchange}.delay.done" if level < 0 else f"{exchange}.delay.{_ttl_label(level)}"


def delay_units(delay_s: float) -> int:
    """The delay in whole units, rounded up so a job never runs early."""
    if isinstance(delay_s, bool) or not isinstance(delay_s, int | float):
        raise InvalidDelayError(delay_s, f"a delay must be a number of seconds, got {delay_s!r}")
    if delay_s < 0 or math.isnan(delay_s):
        raise InvalidDelayError(delay_s, f"a delay must be 0 or more seconds, got {delay_s!r}")
    if delay_s > MAX_DELAY_S:
        raise InvalidDelayError(
            delay_s,
            f"a delay of {delay_s:g} s is longer than the longest Leveret supports "
            f"({MAX_DELAY_S:g} s, about {MAX_DELAY_S / 86_400:.0f} days)",
        )
    # The small epsilon keeps 1.0 s at exactly 4 units despite float noise.
    return math.ceil(delay_s / DELAY_UNIT_S - 1e-9)


def delay_levels(delay_s: float) -> list[int]:
    """The retry levels (bits) a message with this delay passes through."""
    units = delay_units(delay_s)
    return [n for n in range(DELAY_BITS) if units >> n & 1]


def _bits_key(units: int) -> str:
    return ".".join(BIT_SET if units >> n & 1 else BIT_CLEAR for n in reversed(range(DELAY_BITS)))


def delay_address(routing_key: str) -> tuple[str, str] | None:
    """``("q", queue)`` or ``("j", job)`` for a key of the delay chain, else ``None``.

    Reads both the current format and the first layout's 19 ``1``/``0`` words, so a message
    that was in flight when a vhost was upgraded is still understood when it arrives.
    """
    words = routing_key.split(".")
    for bits, alphabet in ((DELAY_BITS, (BIT_SET, BIT_CLEAR)), (LEGACY_DELAY_BITS, ("1", "0"))):
        if (
            len(words) > bits + 1
            and words[bits] in ("q", "j")
            and all(w in alphabet for w in words[:bits])
        ):
            return words[bits], ".".join(words[bits + 1 :])
    return None


def job_from_routing_key(routing_key: str) -> str:
    """The job a routing key names: a delayed job's key names it after the delay words.

    The inverse of ``delayed_job_route`` (old key layouts too, see ``delay_address``); any
    other key is the job's name itself (a publish without ``type``).
    """
    address = delay_address(routing_key)
    if address is not None and address[0] == "j":
        return address[1]
    return routing_key


def _route(exchange: str, delay_s: float, address: str) -> tuple[str, str]:
    """Exchange and routing key that deliver to ``address`` after ``delay_s``.

    The message enters the chain at the exchange of its highest set bit: the exchanges above
    would only pass it down (their bits are 0), one broker routing hop each. A delay of 0
    enters at ``….delay.done`` and arrives at once.
    """
    units = delay_units(delay_s)
    return delay_exchange_name(exchange, units.bit_length() - 1), f"{_bits_key(units)}.{address}"


def retry_route(exchange: str, delay_s: float, queue: str) -> tuple[str, str]:
    """Where to publish a retry that comes back to work queue ``queue`` after ``delay_s``."""
    return _route(exchange, delay_s, f"q.{queue}")


def delayed_job_route(exchange: str, delay_s: float, job: str) -> tuple[str, str]:
    """Where to publish a delayed job: after ``delay_s`` it reaches the queues of ``job``."""
    return _route(exchange, delay_s, f"j.{job}")


def _level_pattern(level: int, bit: str, tail: str) -> str:
    words = [bit if n == level else "*" for n in reversed(range(DELAY_BITS))]
    return ".".join([*words, tail])


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
