"""The delay chain's bound over its whole horizon, proved by summing TTLs, not by waiting.

The route is not computed from ``delay_levels``: ``_deliver`` follows the bindings and queue
arguments ``Topology`` declares (topic matching, TTLs, dead-letter exchanges) the way the broker
would, so a wrong binding pattern, TTL or dead-letter target fails these tests too.
"""

from __future__ import annotations

import random
import re
from functools import cache

import pytest

from leveret.topology import DELAY_BITS, DELAY_UNIT_S, MAX_DELAY_S, Topology, WorkQueue
from leveret.topology.delay import (
    HOP_ALLOWANCE_S,
    MAX_LATENESS_S,
    MAX_ROUTING_KEY,
    delay_address,
    delayed_job_route,
    retry_route,
    v2_exchange_name,
)

LONG = "n" * 199  # the longest name check_name allows
TOPO = Topology(
    queues=(
        WorkQueue(name="email", jobs=("send_email",)),
        WorkQueue(name=LONG, jobs=(LONG[:-1] + "j",)),
    )
)
QUEUES = {q.name: q.arguments for q in TOPO.queue_decls()}
BINDINGS = TOPO.bindings()


@cache
def _pattern(routing_key: str) -> re.Pattern[str]:
    """A topic binding key as a regex over a routing key (AMQP 0-9-1 topic semantics).

    Enough for the chain's patterns, where ``#`` only ever comes last.
    """
    assert "#" not in routing_key.split(".")[:-1]
    parts = []
    for word in routing_key.split("."):
        if word == "#":
            parts.append(r"(?:[^.]*(?:\.[^.]*)*)?")
        elif word == "*":
            parts.append(r"[^.]+")
        else:
            parts.append(re.escape(word))
    regex = ""
    for i, part in enumerate(parts):
        if i == 0:
            regex = part
        elif part.startswith("(?:[^.]*"):  # '#' may also swallow its separating dot
            regex += r"(?:\." + part[:-1] + r")?"
        else:
            regex += r"\." + part
    return re.compile(regex + r"\Z")


def _deliver(exchange: str, key: str) -> list[tuple[str, list[int]]]:
    """Every (work queue, TTLs waited) a message published to ``exchange`` ends up in."""
    out: list[tuple[str, list[int]]] = []
    todo: list[tuple[str, list[int]]] = [(exchange, [])]
    while todo:
        source, ttls = todo.pop()
        assert len(ttls) <= DELAY_BITS, "a route longer than the chain: a loop"
        for b in BINDINGS:
            if b.source != source or not _pattern(b.routing_key).match(key):
                continue
            if b.destination_type == "exchange":
                todo.append((b.destination, ttls))
                continue
            args = QUEUES[b.destination]
            if "x-message-ttl" in args:
                assert "x-dead-letter-routing-key" not in args
                todo.append((args["x-dead-letter-exchange"], [*ttls, args["x-message-ttl"]]))
            else:
                out.append((b.destination, ttls))
    return out


def _check(delay: float) -> int:
    """Route ``delay`` to both address kinds; return the number of queues visited."""
    hops = 0
    for route, address, queue in (
        (retry_route, "email", "email"),
        (delayed_job_route, "send_email", "email"),
        (retry_route, LONG, LONG),
        (delayed_job_route, LONG[:-1] + "j", LONG),
    ):
        exchange, key = route("jobs", delay, address)
        assert len(key.encode()) <= MAX_ROUTING_KEY
        arrivals = _deliver(exchange, key)
        assert [q for q, _ in arrivals] == [queue], (delay, arrivals)  # exactly once
        ttls = arrivals[0][1]
        waited = sum(ttls) / 1000
        # No earlier than due (1e-9 s: float noise of the delay itself), at most one unit late.
        assert delay - 1e-9 <= waited < delay + DELAY_UNIT_S, (delay, waited)
        hops = len(ttls)
    return hops


def test_the_horizon_covers_a_leap_year_and_the_lateness_bound_is_under_a_second() -> None:
    """388 days of delay; 250 ms rounding plus a hop allowance per visited queue stays < 1 s."""
    assert MAX_DELAY_S >= 366 * 86_400
    assert MAX_LATENESS_S == DELAY_UNIT_S + DELAY_BITS * HOP_ALLOWANCE_S <= 1.0


def test_every_power_of_two_boundary_zero_and_the_maximum_are_within_bounds() -> None:
    """Just below, at and just above 2**k units for every k, plus 0 and MAX_DELAY_S."""
    delays = [0.0, 0.001, DELAY_UNIT_S, MAX_DELAY_S, MAX_DELAY_S - 0.001, 366 * 86_400.0]
    for k in range(DELAY_BITS):
        edge = (1 << k) * DELAY_UNIT_S
        delays += [edge - 0.001, edge, edge + 0.001, edge - DELAY_UNIT_S]
    for delay in delays:
        if 0 <= delay <= MAX_DELAY_S:
            assert _check(delay) <= DELAY_BITS
    # 2**27 - 1 units visits every queue once: the hop bound is reached, never exceeded.
    assert _check(MAX_DELAY_S) == DELAY_BITS
    assert _check(0) == 0


def test_random_delays_across_the_whole_range_are_within_bounds() -> None:
    """Uniform and log-uniform samples up to the horizon (fixed seed: reproducible)."""
    rng = random.Random(11)
    for _ in range(1500):
        _check(rng.uniform(0, MAX_DELAY_S))
        _check(10 ** rng.uniform(-3, 7.52))


def test_delays_past_the_horizon_are_refused() -> None:
    with pytest.raises(ValueError, match="longest"):
        retry_route("jobs", MAX_DELAY_S + 0.25, "email")


def test_the_address_reads_back_from_both_key_formats() -> None:
    """New keys, and the first layout's 19 ``1``/``0`` words still in flight after an upgrade."""
    assert delay_address(delayed_job_route("jobs", 95, "a.b")[1]) == ("j", "a.b")
    assert delay_address(retry_route("jobs", 0, "email")[1]) == ("q", "email")
    legacy = ".".join(["0"] * 16 + ["1", "0", "1"]) + ".j.send_email"
    assert delay_address(legacy) == ("j", "send_email")
    assert delay_address("send_email") is None
    assert delay_address("1.q.x") is None


def test_a_retry_returns_to_the_queue_it_left_when_two_queues_serve_one_job() -> None:
    """The shared chain routes back by the queue named in the key, never by the job name."""
    global QUEUES, BINDINGS
    both = Topology(
        queues=(WorkQueue(name="a", jobs=("same",)), WorkQueue(name="b", jobs=("same",)))
    )
    saved = QUEUES, BINDINGS
    QUEUES, BINDINGS = {q.name: q.arguments for q in both.queue_decls()}, both.bindings()
    try:
        for delay in (0, 0.25, 1.0, 7.77, 3600.0, 366 * 86_400.0):
            for queue in ("a", "b"):
                assert [q for q, _ in _deliver(*retry_route("jobs", delay, queue))] == [queue]
            # A delayed publish goes where the jobs exchange sends the name: both, once each.
            arrivals = _deliver(*delayed_job_route("jobs", delay, "same"))
            assert sorted(q for q, _ in arrivals) == ["a", "b"], (delay, arrivals)
    finally:
        QUEUES, BINDINGS = saved


def test_a_v2_exchange_forwards_into_the_shared_chain() -> None:
    """What a v2 retry queue dead-letters (to the v2 exchange one bit down), or a v2 publisher
    sends, continues in the v3 chain and waits the rest of its delay, once."""
    units = (1 << 10) + (1 << 3) + 1
    _, key = retry_route("jobs", units * DELAY_UNIT_S, "email")
    # As if it had waited out bit 10 in email.retry.256s: dead-lettered to the v2 exchange of 8.
    arrivals = _deliver(v2_exchange_name("jobs", 9), key)
    assert arrivals == [("email", [2000, 250])]
    arrivals = _deliver(v2_exchange_name("jobs", 10), key)  # a v2 publisher's entry
    assert arrivals == [("email", [256_000, 2000, 250])]
