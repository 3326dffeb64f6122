"""The delay chain: delayed retries and delayed jobs at any horizon, without broker plugins.

A message with a *per-message* TTL only expires when it reaches the head of its queue, so one
TTL queue holding mixed delays lets a 1 s retry wait behind a 1 h one. Every delay queue here
therefore has a *queue-level* ``x-message-ttl``: everything in it waits exactly as long, and the
head is always the first to expire, whatever its destination.

Delays are counted in units of ``DELAY_UNIT_S`` (250 ms) and written in binary. For each bit ``n``
of ``DELAY_BITS`` (27) there is **one delay queue per exchange**, shared by every work queue of
the vhost: ``<exchange>.delay.<ttl>`` with a TTL of ``2**n`` units (``jobs.delay.250ms``,
``jobs.delay.500ms``, ``jobs.delay.1s`` … ``jobs.delay.16777216s``). 27 queues, whether the vhost
has 1 work queue or 500, and whatever the delays. A delayed message carries its delay in its
routing key, most significant bit first, one word per bit (``+`` for 1, ``=`` for 0), followed
by its destination: ``=.=.….+.=.+.q.<queue>`` (a retry: back to the work queue it left, and
only to it) or ``….j.<job>`` (a delayed publish, routed like the ``jobs`` exchange routes the
job name).

It travels down a chain of topic exchanges, one per bit (``jobs.delay.chain.16777216s`` …
``jobs.delay.chain.250ms``, then ``jobs.delay.done``), entering at the exchange of its highest
set bit. The exchange for bit ``n`` sends the message into the delay queue of ``2**n`` units
when that bit is 1 (binding ``<bit n is +>.#``: any destination), and straight on to the next
exchange when it is 0. A delay queue dead-letters expired messages to the next exchange down
the chain, keeping the routing key, so the message visits exactly the queues of its set bits and
waits the sum of their TTLs: its delay, rounded *up* to the next 250 ms. ``jobs.delay.done``
finally routes it by the destination its key carries: ``<27 words>.q.<queue>`` is bound to that
one work queue, so a retry comes back to the queue it left even when two work queues serve the
same job name.

The bound, for any delay from 0 up to ``MAX_DELAY_S`` (2**27 − 1 units, about 388 days, past
the 366 the contract asks for): the TTLs a message waits sum to a value in
[delay, delay + 250 ms) (``tests/topology/test_horizon.py`` proves it by summing the TTLs of the
route for every power-of-two boundary, 0, the maximum and random samples, not by waiting). On
top of that each set bit costs one dead-letter hop; a message visits at most ``DELAY_BITS``
queues, so with ``HOP_ALLOWANCE_S`` (25 ms, measured at a few ms on an idle 3.10 broker) per hop
the lateness is at most 250 ms + 27 × 25 ms = 925 ms: no earlier than due, at most 1 s late at
normal load. A delay of 0 (a DLQ replay) takes the same road without waiting anywhere.

The v2 layout, and upgrading from it. Until v3 every work queue ``Q`` had 27 queues of its own,
``Q.retry.<ttl>`` (``retry_queue_name``), fed by the chain exchanges of that time, which had the
names ``<exchange>.delay.<ttl>`` (``v2_exchange_name``; the same names as today's delay
*queues*, in the exchanges' namespace) and ended at the same ``<exchange>.delay.done``. A
``Q.retry.<ttl>`` dead-letters to the v2 exchange one bit down (its ``x-dead-letter-exchange``
cannot change). So the v2 exchanges stay declared, and each is bound with ``#`` to the v3
chain exchange of its bit: whatever still waits in a v2 queue (or is published by a v2
publisher) continues in the shared chain and reaches ``Q``. ``declare`` also removes the v2
bindings that would copy a message twice (each v2 exchange's skip binding to the next v2
exchange, and its bindings into ``Q.retry.<ttl>`` for the topology's queues), so no message
enters a v2 queue any more and each one, once empty, can be deleted on its own
(``leveret doctor`` lists them). ``tests/topology/test_upgrade.py`` declares a v2 vhost with
jobs waiting at several levels, upgrades it and counts every job arriving once.

Why ``+``/``=`` and not ``1``/``0``, and why names stop at 199 characters. The first layout's
chain had 19 bits (36.4 h) written ``1``/``0``; its bindings may still sit on the v2 exchanges.
Bit words that are not ``0``/``1`` and not a possible name word (names use ``[A-Za-z0-9_:-]``)
can match none of them, and no old key can match a new binding, so no message is ever copied
by a leftover binding. A routing key is at most 255 bytes: 27 × 2 bytes of bits, ``j.`` and the
name leave 199 bytes for a queue or job name (``_MAX_NAME``). ``delay_address`` reads the
address back from a key of either format.
"""

from __future__ import annotations

import math

from leveret.topology.errors import InvalidDelayError

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


def _ttl_label(level: int) -> str:
    ms = int(DELAY_UNIT_S * 1000) << level
    return f"{ms}ms" if ms < 1000 else f"{ms // 1000}s"


def delay_queue_name(exchange: str, level: int) -> str:
    """The shared delay queue of bit ``level``: ``<exchange>.delay.<ttl>``."""
    return f"{exchange}.delay.{_ttl_label(level)}"


def delay_queue_names(exchange: str) -> list[str]:
    """Every delay queue of ``exchange``: ``DELAY_BITS`` of them, shortest TTL first."""
    return [delay_queue_name(exchange, n) for n in range(DELAY_BITS)]


def delay_queue_prefix(exchange: str) -> str:
    """What every delay queue (and chain exchange) name of ``exchange`` starts with."""
    return f"{exchange}.delay."


def retry_ttl_ms(level: int) -> int:
    return int(DELAY_UNIT_S * 1000) << level


def delay_exchange_name(exchange: str, level: int) -> str:
    """The chain exchange that decides bit ``level``; ``-1`` is the final ``….delay.done``."""
    if level < 0:
        return f"{exchange}.delay.done"
    return f"{exchange}.delay.chain.{_ttl_label(level)}"


def retry_queue_name(queue: str, level: int) -> str:
    """A v2 per-queue retry queue, ``Q.retry.<ttl>``: no longer declared, only drained."""
    return f"{queue}.retry.{_ttl_label(level)}"


def v2_exchange_name(exchange: str, level: int) -> str:
    """The v2 chain exchange of bit ``level`` (``<exchange>.delay.<ttl>``); ``-1`` is
    ``….delay.done``, which v3 still routes through. Kept declared as an entry to the v3 chain."""
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
