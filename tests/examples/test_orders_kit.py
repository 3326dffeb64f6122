"""examples/orders with ``leveret.testing.TestBroker``: the whole pipeline in memory, no broker,
no Redis (locks, done marks and groups are kept in memory by the kit)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from examples.orders.app import GroupStarter, Order, build
from examples.orders.services import (
    DECLINED_CARD,
    GOOD_CARD,
    TIMEOUT_CARD,
    Services,
)
from leveret.producers import Job
from leveret.testing import TestBroker, run_job


class BrokerGroups(GroupStarter):
    """``GroupStarter`` on the in-memory broker: ``fulfil`` publishes its group there.

    ``TestBroker.group`` takes no ``group_id``; the group gets a fresh id."""

    def __init__(self) -> None:
        self.broker: TestBroker | None = None

    async def start(self, order: Order) -> str:
        assert self.broker is not None
        return await self.broker.group(
            [Job("send_email", order), Job("make_invoice", order)],
            then=Job("order_done", order),
        )


def order(order_id: str, *, sku: str = "LEV-MUG", qty: int = 1, card: str = GOOD_CARD,
          email: str = "ada@example.com") -> dict[str, Any]:  # fmt: skip
    return {"order_id": order_id, "sku": sku, "qty": qty, "card": card, "email": email}


async def _run(*orders: dict[str, Any]) -> tuple[TestBroker, Services]:
    services = Services.default(hold_s=0)
    worker = build(services=services)
    groups = BrokerGroups()
    async with TestBroker(worker, overrides={GroupStarter: groups}) as broker:
        groups.broker = broker
        for o in orders:
            await broker.publish("place_order", o)
        await broker.join()
    return broker, services


async def test_a_good_order_goes_through_every_step_once() -> None:
    broker, services = await _run(order("o-1", sku="LEV-TEE", qty=2))

    assert [s.job for s in broker.succeeded] == [
        "place_order",
        "reserve_stock",
        "charge",
        "fulfil",
        "send_email",
        "make_invoice",
        "order_done",
    ]
    assert broker.dead == [] and broker.retries == []
    assert services.stock.levels["LEV-TEE"] == 98
    assert services.payments.charges == {"o-1": 5000}
    assert services.mailer.sent == [("ada@example.com", "Your order o-1 is on its way")]
    (record,) = services.book.completed
    assert record["order_id"] == "o-1" and record["state"] == "complete"
    assert record["invoice"] == "INV-o-1" and record["emailed"] == "ada@example.com"
    assert record["failed"] == {}
    status = broker.group_status(record["group_id"])
    assert status.counts == {"succeeded": 2, "dead": 0, "cancelled": 0, "pending": 0}
    assert status.then_state == "succeeded"


async def test_a_declined_card_is_dead_rejected_and_never_fulfilled() -> None:
    broker, services = await _run(order("o-2", card=DECLINED_CARD))

    assert [s.job for s in broker.succeeded] == ["place_order", "reserve_stock"]
    assert [(d.job, d.reason, d.attempts) for d in broker.dead] == [("charge", "rejected", 1)]
    assert broker.dead[0].error == "CardDeclined: card ending 0002 declined"
    assert broker.retries == []  # not in retry_on: no second call to the provider
    assert services.payments.calls == ["o-2"] and services.payments.charges == {}
    assert services.book.completed == [] and services.mailer.sent == []


async def test_a_payment_timeout_is_retried_once_then_charged_once() -> None:
    broker, services = await _run(order("o-3", card=TIMEOUT_CARD))

    assert [(r.job, r.attempt, r.delay_s) for r in broker.retries] == [("charge", 1, 1.0)]
    assert broker.retries[0].error.startswith("PaymentTimeout:")
    charges = [s for s in broker.succeeded if s.job == "charge"]
    assert [(s.attempts, s.result) for s in charges] == [
        (2, {"charge_id": "ch_o-3", "cents": 1200})
    ]
    assert services.payments.calls == ["o-3", "o-3"] and services.payments.charges == {"o-3": 1200}
    assert [r["order_id"] for r in services.book.completed] == ["o-3"]
    assert broker.dead == []


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ({"qty": 0}, "qty: Input should be greater than or equal to 1"),
        ({"sku": "LEV-SOFA"}, "sku: Value error, unknown SKU"),
        ({"email": "not-an-address"}, "email: String should match pattern"),
    ],
)
async def test_a_bad_order_is_rejected_before_anything_happens(
    bad: dict[str, Any], why: str
) -> None:
    broker, services = await _run({**order("o-4"), **bad})

    assert broker.succeeded == []
    ((job, reason, attempts, error),) = [
        (d.job, d.reason, d.attempts, d.error) for d in broker.dead
    ]
    assert (job, reason, attempts) == ("place_order", "rejected", 1)
    assert error.startswith("Reject: bad order o-4: ") and why in error
    assert services.stock.reservations == [] and services.payments.calls == []


async def test_a_malformed_request_is_invalid_not_run() -> None:
    broker, _ = await _run({"order_id": "o-5"})  # no sku, qty, ...: the request model fails
    assert [(d.job, d.reason) for d in broker.dead] == [("place_order", "invalid")]


async def test_several_orders_each_done_once_and_stock_adds_up() -> None:
    broker, services = await _run(
        order("a", qty=3),
        order("b", card=TIMEOUT_CARD),
        order("c", card=DECLINED_CARD),
        order("d", sku="LEV-CAP"),
        order("e", qty=2),
    )
    done = Counter(r["order_id"] for r in services.book.completed)
    assert done == {"a": 1, "b": 1, "d": 1, "e": 1}
    # c reserved its unit, then its card was declined: the reservation stays (see README).
    assert services.stock.levels["LEV-MUG"] == 100 - 3 - 1 - 1 - 2
    assert services.stock.overlaps == []
    assert Counter(s.job for s in broker.succeeded)["order_done"] == 4


async def test_charge_alone_with_run_job() -> None:
    services = Services.default(hold_s=0)
    worker = build(services=services)
    enqueued: list[Any] = []
    result = await run_job(worker, "charge", order("o-6", qty=2), enqueued=enqueued)
    assert result == {"charge_id": "ch_o-6", "cents": 2400}
    assert [e.job for e in enqueued] == ["fulfil"]
