"""The order pipeline: an order comes in over HTTP and goes through six jobs.

    POST /jobs/place_order  (leveret api orders.app:worker)
      place_order    validate the order; a bad one is rejected (Reject: DLQ, no retry)
      reserve_stock  lock="stock:{sku}": never two reservations of one SKU at once
      charge         idempotency_key="{order_id}", retry_on=(PaymentTimeout,): a timeout is
                     retried, a declined card goes straight to the DLQ (rejected)
      fulfil         publishes a group: send_email and make_invoice, then order_done
      send_email  |  make_invoice     (the group's members, on their own queues)
      order_done     runs once both members ended; reads ctx.group and records the order

Each step enqueues the next with ``ctx.enqueue``: a follow-up is published only if its step
succeeded, and confirmed by the broker before that step is acked. A handler cannot start a
group through ``ctx`` (there is no ``ctx.group(...)``), so ``fulfil`` publishes it through a
``Publisher`` opened once per worker process (a process-scoped resource, ``GroupStarter``).

Run it (README.md): ``leveret worker orders.app:worker`` and ``leveret api orders.app:worker``
from ``examples/``, with ``LEVERET_STATUS_URL`` set (locks, idempotency and groups use Redis).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from leveret import JobContext, Publisher, Reject, Worker, WorkerSettings
from leveret.producers import Job

from .services import (
    CATALOGUE,
    Mailer,
    OrderBook,
    OutOfStock,
    Payments,
    PaymentTimeout,
    Services,
    Stock,
)

# -- payloads ------------------------------------------------------------------------------------


class OrderRequest(BaseModel):
    """What POST /jobs/place_order accepts: the shape only (a wrong shape is a 422 at the API)."""

    order_id: str
    sku: str
    qty: int
    card: str
    email: str


class Order(BaseModel):
    """An order that passed validation; every later step's payload."""

    model_config = ConfigDict(frozen=True)

    order_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    sku: str
    qty: int = Field(ge=1, le=10)
    card: str = Field(pattern=r"^[0-9]{12,19}$")
    email: str = Field(pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")

    @field_validator("sku")
    @classmethod
    def _known_sku(cls, sku: str) -> str:
        if sku not in CATALOGUE:
            raise ValueError(f"unknown SKU (we sell {', '.join(sorted(CATALOGUE))})")
        return sku

    @property
    def total_cents(self) -> int:
        return CATALOGUE[self.sku] * self.qty


def group_id_of(order_id: str) -> str:
    """The id of an order's email+invoice group: ``pub.status(group_id_of(...))``."""
    return f"group-order-{order_id}"


# -- starting a group from a handler -------------------------------------------------------------


class GroupStarter:
    """Publishes an order's group: ``send_email`` and ``make_invoice``, then ``order_done``."""

    def __init__(self, pub: Publisher) -> None:
        self.pub = pub

    async def start(self, order: Order) -> str:
        return await self.pub.group(
            [Job("send_email", order), Job("make_invoice", order)],
            then=Job("order_done", order),
            group_id=group_id_of(order.order_id),
        )


# -- the app -------------------------------------------------------------------------------------


def build(
    settings: WorkerSettings | None = None,
    services: Services | None = None,
    registry: CollectorRegistry | None = None,
) -> Worker:
    """The order worker. ``services`` are the (fake) outside world its jobs talk to; tests pass
    their own to look inside afterwards."""
    worker = Worker(settings, registry=registry)
    svc = services if services is not None else Services.default()

    # The outside world, one instance per worker process.
    @worker.resource(scope="process")
    def stock() -> Stock:
        return svc.stock

    @worker.resource(scope="process")
    def payments() -> Payments:
        return svc.payments

    @worker.resource(scope="process")
    def mailer() -> Mailer:
        return svc.mailer

    @worker.resource(scope="process")
    def book() -> OrderBook:
        return svc.book

    @worker.resource(scope="process")
    async def groups() -> AsyncIterator[GroupStarter]:
        """A publisher for ``fulfil``, on the worker's own broker, exchange and Redis."""
        status = worker.settings.status_url
        async with Publisher(
            settings=worker.settings,
            status_url=status.get_secret_value() if status is not None else None,
        ) as pub:
            yield GroupStarter(pub)

    # 1. validate ---------------------------------------------------------------------------

    @worker.job("place_order", queue="orders", max_attempts=3, backoff=1.0)
    async def place_order(request: OrderRequest, ctx: JobContext) -> dict[str, Any]:
        try:
            order = Order.model_validate(request.model_dump())
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise Reject(f"bad order {request.order_id}: {problems}") from None
        await ctx.enqueue("reserve_stock", order)
        ctx.log.info("order_placed", order_id=order.order_id, total_cents=order.total_cents)
        return {"order_id": order.order_id, "total_cents": order.total_cents}

    # 2. reserve stock: one reservation per SKU at a time, across every worker ----------------

    @worker.job("reserve_stock", queue="stock", lock="stock:{sku}", max_attempts=5, backoff=1.0)
    async def reserve_stock(order: Order, stock: Stock, ctx: JobContext) -> dict[str, Any]:
        try:
            reservation = await stock.reserve(order.order_id, order.sku, order.qty)
        except OutOfStock as exc:
            raise Reject(str(exc)) from None
        await ctx.enqueue("charge", order)
        return {"sku": reservation.sku, "qty": reservation.qty, "lock_token": ctx.lock_token}

    # 3. charge: once per order; a timeout is retried, anything else (a decline) is not --------

    @worker.job(
        "charge",
        queue="payments",
        idempotency_key="{order_id}",
        retry_on=(PaymentTimeout,),
        max_attempts=3,
        backoff=1.0,
    )
    async def charge(order: Order, payments: Payments, ctx: JobContext) -> dict[str, Any]:
        charge_id = await payments.charge(order.order_id, order.card, order.total_cents)
        await ctx.enqueue("fulfil", order)
        return {"charge_id": charge_id, "cents": order.total_cents}

    # 4. fulfil: email and invoice in parallel, order_done after both -------------------------

    @worker.job("fulfil", queue="orders", idempotency_key="{order_id}", backoff=1.0)
    async def fulfil(order: Order, groups: GroupStarter) -> str:
        return await groups.start(order)

    @worker.job("send_email", queue="email", max_attempts=5, backoff=2.0)
    async def send_email(order: Order, mailer: Mailer, ctx: JobContext) -> dict[str, str]:
        key = f"order-email:{order.order_id}"
        if not await ctx.done_before(key):  # a rerun never mails twice
            await mailer.send(order.email, f"Your order {order.order_id} is on its way")
            await ctx.mark_done(key)
        return {"to": order.email}

    @worker.job("make_invoice", queue="invoices", max_attempts=5, backoff=2.0)
    async def make_invoice(order: Order) -> dict[str, Any]:
        return {"invoice": f"INV-{order.order_id}", "cents": order.total_cents}

    # 5. done: once, with what the group's members returned ------------------------------------

    @worker.job("order_done", queue="orders", idempotency_key="{order_id}")
    async def order_done(order: Order, book: OrderBook, ctx: JobContext) -> dict[str, Any]:
        group = ctx.group
        results = {m.job: m.result for m in group.succeeded}
        failed = {m.job: m.error for m in group.failed}
        record = {
            "order_id": order.order_id,
            "state": "complete" if not failed else "needs_attention",
            "invoice": (results.get("make_invoice") or {}).get("invoice"),
            "emailed": (results.get("send_email") or {}).get("to"),
            "failed": failed,
            "group_id": group.id,
        }
        book.complete(record)
        ctx.log.info("order_done", **record)
        return record

    return worker


# What `leveret worker orders.app:worker` and `leveret api orders.app:worker` load: settings
# from LEVERET_* variables, the fake services in this process.
worker = build()
