"""The layout as data: names, arguments, and the retry-delay design's bounds."""

from __future__ import annotations

import re

import pytest

from leveret.topology import (
    DELAY_BITS,
    MAX_DELAY_S,
    Topology,
    WorkQueue,
    delay_levels,
    delay_queue_name,
    delay_queue_names,
    retry_route,
    retry_ttl_ms,
    to_definitions,
)
from leveret.topology.definitions import permission_regexes
from leveret.topology.delay import delay_exchange_name
from leveret.topology.model import BindingDecl, QueueDecl


def _bound(delay: float) -> float:
    return max(1.0, 0.1 * delay)


@pytest.mark.parametrize(
    "delay", [1.0, 1.001, 1.3, 2.0, 7.77, 10.0, 59.9, 600.0, 3599.5, 86_399.9, 86_400.0]
)
def test_the_chain_waits_no_less_than_the_delay_and_at_most_the_bound_more(delay: float) -> None:
    """Summing the TTLs of the queues a delay passes through gives [delay, delay + bound)."""
    waited = sum(retry_ttl_ms(n) for n in delay_levels(delay)) / 1000
    assert delay <= waited < delay + _bound(delay)
    assert waited - delay <= 0.25  # the chain's own resolution


def test_every_delay_from_one_second_to_a_day_is_within_bounds() -> None:
    """A sweep over 1 s … 24 h in uneven steps never breaks the bound."""
    delay = 1.0
    while delay <= 86_400:
        waited = sum(retry_ttl_ms(n) for n in delay_levels(delay)) / 1000
        assert delay <= waited < delay + _bound(delay), delay
        delay = delay * 1.0137 + 0.0113


def test_delays_beyond_the_chain_are_refused() -> None:
    """A delay longer than the chain can express raises instead of running early."""
    with pytest.raises(ValueError, match="longest"):
        delay_levels(MAX_DELAY_S + 1)
    with pytest.raises(ValueError):
        delay_levels(-1)


def test_each_work_queue_has_two_queues_and_the_chain_is_shared() -> None:
    """Q and Q.dlq per work queue; DELAY_BITS delay queues <exchange>.delay.<ttl> for all."""
    topo = Topology(queues=(WorkQueue(name="email", jobs=("send_email",)),))
    names = [q.name for q in topo.queue_decls()]
    assert names[:2] == ["email", "email.dlq"]
    delay = names[2:]
    assert delay == delay_queue_names("jobs")
    assert len(delay) == DELAY_BITS == 27
    assert delay[0] == "jobs.delay.250ms" and delay[4] == "jobs.delay.4s"
    assert not any(".retry." in n for n in names)


def test_the_chain_does_not_grow_with_work_queues() -> None:
    """50 work queues have the very same delay queues and chain bindings as 1 (contract v3)."""
    one = Topology(queues=(WorkQueue(name="q-00", jobs=("j-00",)),))
    many = Topology(
        queues=tuple(WorkQueue(name=f"q-{i:02d}", jobs=(f"j-{i:02d}",)) for i in range(50))
    )
    prefix = "jobs.delay."

    def chain(t: Topology) -> tuple[list[QueueDecl], list[BindingDecl]]:
        queues = [q for q in t.queue_decls() if q.name.startswith(prefix)]
        bindings = [b for b in t.bindings() if b.destination.startswith(prefix)]
        return queues, bindings

    assert chain(one) == chain(many)
    assert len(chain(many)[0]) == DELAY_BITS
    assert len(many.queue_decls()) == 2 * 50 + DELAY_BITS
    # Into the delay queues: one binding per bit, whatever the destination.
    assert len([b for b in chain(many)[1] if b.destination_type == "queue"]) == DELAY_BITS


def test_queue_arguments_follow_the_contract() -> None:
    """The work queue is a priority queue; delay queues have a TTL and a route onward; DLQ none."""
    topo = Topology(queues=(WorkQueue(name="email", jobs=("send_email",)),))
    decls = {q.name: q.arguments for q in topo.queue_decls()}
    assert decls["email"]["x-max-priority"] == 10
    assert decls["email.dlq"] == {}
    for n in range(DELAY_BITS):
        args = decls[delay_queue_name("jobs", n)]
        assert args["x-message-ttl"] == 250 * 2**n
        assert args["x-dead-letter-exchange"] == delay_exchange_name("jobs", n - 1)
        assert "x-dead-letter-routing-key" not in args  # keeps the routing key: the address
        assert "x-queue-type" not in args


def test_quorum_queues_drop_priorities_and_gain_a_delivery_limit() -> None:
    """queue_type=quorum switches every queue of Q, and the shared delay queues, to quorum."""
    topo = Topology(queues=(WorkQueue(name="q", jobs=("j",), queue_type="quorum"),))
    decls = {q.name: q.arguments for q in topo.queue_decls()}
    assert decls["q"]["x-queue-type"] == "quorum"
    assert "x-max-priority" not in decls["q"]
    assert decls["q"]["x-delivery-limit"] > 0
    assert all(a["x-queue-type"] == "quorum" for a in decls.values())
    assert decls["jobs.delay.1s"]["x-dead-letter-strategy"] == "at-least-once"
    assert decls["jobs.delay.1s"]["x-overflow"] == "reject-publish"


def test_routing_keys_carry_the_delay_bits_and_the_address() -> None:
    """1 s is four 250 ms units: bit 2 only, then the queue address; 0 goes straight out."""
    assert retry_route("jobs", 0, "email")[0] == "jobs.delay.done"
    exchange, key = retry_route("jobs", 1.0, "email")
    assert exchange == "jobs.delay.chain.1s"  # enters at its highest set bit
    bits = key.split(".")[:DELAY_BITS]
    assert key.endswith(".q.email")
    assert [i for i, b in enumerate(reversed(bits)) if b == "+"] == [2]
    assert set(bits) == {"+", "="}


@pytest.mark.parametrize("name", ["", "a b", "x*", "a.#", "a..b", "x" * 200, "a+", "="])
def test_names_that_would_break_routing_are_refused(name: str) -> None:
    """Queue and job names become routing-key words; wildcards and blanks are refused."""
    with pytest.raises(ValueError):
        WorkQueue(name=name)
    with pytest.raises(ValueError):
        WorkQueue(name="ok", jobs=(name,))


def test_derived_names_cannot_be_used_as_work_queues() -> None:
    """A work queue called x.dlq, x.retry.y or <exchange>.delay.y would collide with the layout."""
    for name in ("a.dlq", "a.retry.1s"):
        with pytest.raises(ValueError, match="collides"):
            WorkQueue(name=name)
    with pytest.raises(ValueError, match="collides"):
        Topology(exchange="app", queues=(WorkQueue(name="app.delay.1s"),))
    Topology(exchange="app", queues=(WorkQueue(name="jobs.delay.1s"),))  # another exchange's


def test_definitions_hold_every_exchange_queue_and_binding() -> None:
    """The export is the same layout declare() applies, in RabbitMQ's definitions format."""
    topo = Topology(queues=(WorkQueue(name="email", jobs=("send_email", "send_sms")),))
    defs = to_definitions(topo, vhost="v")
    assert {e["name"] for e in defs["exchanges"]} == {e.name for e in topo.exchanges()}
    assert len(defs["queues"]) == len(topo.queue_decls())
    assert {(b["source"], b["destination"], b["routing_key"]) for b in defs["bindings"]} == {
        (b.source, b.destination, b.routing_key) for b in topo.bindings()
    }
    assert ("jobs", "email", "send_sms") in {
        (b["source"], b["destination"], b["routing_key"]) for b in defs["bindings"]
    }
    assert all(x["vhost"] == "v" for x in defs["queues"] + defs["exchanges"] + defs["bindings"])


def test_exported_permissions_cover_the_scheduler_token_queue() -> None:
    """Workers with schedules declare, publish to and consume ``<exchange>.scheduler.<app>``."""
    topo = Topology(queues=(WorkQueue(name="email", jobs=("send_email",)),))
    regexes = permission_regexes(topo)
    for kind in ("configure", "write", "read"):
        assert re.match(regexes[kind], "jobs.scheduler.s-0123456789ab"), kind
        assert not re.match(regexes[kind], "other.scheduler.x"), kind


def test_exported_permissions_cover_broker_locks_and_rate_limits() -> None:
    """Without Redis a worker declares and deletes ``<exchange>.lock.<digest>`` queues (lock=)
    and takes turns on ``<exchange>.ratelimit.<job>`` queues (a broker rate limit)."""
    topo = Topology(queues=(WorkQueue(name="email", jobs=("send_email",)),))
    regexes = permission_regexes(topo)
    for kind in ("configure", "write", "read"):
        for name in ("jobs.lock.0123456789abcdef", "jobs.ratelimit.send_email"):
            assert re.match(regexes[kind], name), (kind, name)
        assert not re.match(regexes[kind], "other.lock.0123"), kind


def test_exported_permissions_cover_the_delay_chain() -> None:
    """The shared delay queues and chain exchanges, and the v2 retry queues declare unbinds."""
    topo = Topology(queues=(WorkQueue(name="email", jobs=("send_email",)),))
    regexes = permission_regexes(topo)
    for name in ("jobs.delay.1s", "jobs.delay.chain.1s", "jobs.delay.done", "email.retry.1s"):
        assert re.match(regexes["configure"], name), name
        assert re.match(regexes["write"], name), name
    assert not re.match(regexes["configure"], "other.delay.1s")
