"""The outside world of the order pipeline, faked in memory: a warehouse, a payment provider, a
mailer and the order book. The handlers in ``app.py`` reach them as ``@worker.resource``s, so a
real deployment swaps these classes for real clients and the jobs stay as they are.

The fakes are deliberately easy to catch misbehaving:

* ``Stock.reserve`` reads a level, waits (a slow warehouse call), then writes the level back: two
  reservations of one SKU at once would lose an update. Each reservation also records its start
  and end times and any other reservation of the same SKU it overlapped (``overlaps``).
* ``Payments.charge`` declines one test card and times out once per order on another, like a
  provider's sandbox, and counts every call and every charge.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

# Prices in cents; an order for a SKU not listed here is rejected.
CATALOGUE: dict[str, int] = {"LEV-MUG": 1200, "LEV-TEE": 2500, "LEV-CAP": 1800}

# Sandbox cards (any other card of 12-19 digits is charged normally).
GOOD_CARD = "4242424242424242"
DECLINED_CARD = "4000000000000002"  # always declined
TIMEOUT_CARD = "4000000000000119"  # the provider times out on the first call for each order


class OutOfStock(Exception):
    """Not enough units of a SKU left."""


class PaymentTimeout(TimeoutError):
    """The payment provider did not answer in time: nothing was charged, try again."""


class CardDeclined(Exception):
    """The payment provider refused the card: trying again will not help."""


@dataclass(frozen=True)
class Reservation:
    order_id: str
    sku: str
    qty: int
    started: float  # time.monotonic() when the reservation began
    ended: float  # and when it was written


@dataclass
class Stock:
    """Units left per SKU, with every reservation's start and end time."""

    levels: dict[str, int]
    hold_s: float = 0.05  # how long the "warehouse call" takes between the read and the write
    reservations: list[Reservation] = field(default_factory=list)
    overlaps: list[tuple[str, str, str]] = field(default_factory=list)  # (sku, running, arrived)
    _active: dict[str, set[str]] = field(default_factory=dict)
    _reserved: dict[str, Reservation] = field(default_factory=dict)

    async def reserve(self, order_id: str, sku: str, qty: int) -> Reservation:
        """Take ``qty`` units of ``sku`` for ``order_id`` (again: the first reservation)."""
        if order_id in self._reserved:  # a rerun of the same order: already done
            return self._reserved[order_id]
        started = time.monotonic()
        running = self._active.setdefault(sku, set())
        self.overlaps.extend((sku, other, order_id) for other in sorted(running))
        running.add(order_id)
        try:
            left = self.levels.get(sku, 0)  # read ...
            await asyncio.sleep(self.hold_s)  # ... the slow part ...
            if left < qty:
                raise OutOfStock(f"{sku}: {left} left, {qty} wanted")
            self.levels[sku] = left - qty  # ... write: lost if another ran in between
        finally:
            running.discard(order_id)
        reservation = Reservation(order_id, sku, qty, started, time.monotonic())
        self.reservations.append(reservation)
        self._reserved[order_id] = reservation
        return reservation


@dataclass
class Payments:
    """A payment provider's sandbox. ``charges``: order id -> cents actually charged."""

    charges: dict[str, int] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)  # order ids, one per call
    _timed_out: set[str] = field(default_factory=set)

    async def charge(self, order_id: str, card: str, cents: int) -> str:
        """Charge ``cents`` to ``card``; the order id is the provider's idempotency key, so a
        second call for one order charges nothing more. Returns the charge id."""
        self.calls.append(order_id)
        await asyncio.sleep(0.01)
        if card == DECLINED_CARD:
            raise CardDeclined(f"card ending {card[-4:]} declined")
        if card == TIMEOUT_CARD and order_id not in self._timed_out:
            self._timed_out.add(order_id)
            raise PaymentTimeout("payment provider did not answer within 10 s")
        self.charges.setdefault(order_id, cents)
        return f"ch_{order_id}"


@dataclass
class Mailer:
    sent: list[tuple[str, str]] = field(default_factory=list)  # (to, subject)

    async def send(self, to: str, subject: str) -> None:
        await asyncio.sleep(0.01)
        self.sent.append((to, subject))


@dataclass
class OrderBook:
    """Where finished orders are recorded (a table in a real shop)."""

    completed: list[dict[str, Any]] = field(default_factory=list)

    def complete(self, record: dict[str, Any]) -> None:
        self.completed.append(record)


@dataclass
class Services:
    """Everything the jobs talk to, one instance per worker process."""

    stock: Stock
    payments: Payments = field(default_factory=Payments)
    mailer: Mailer = field(default_factory=Mailer)
    book: OrderBook = field(default_factory=OrderBook)

    @classmethod
    def default(cls, hold_s: float = 0.05) -> Services:
        return cls(Stock({sku: 100 for sku in CATALOGUE}, hold_s=hold_s))
