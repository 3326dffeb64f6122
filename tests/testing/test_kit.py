"""leveret.testing: run_job and TestBroker, the way a user's own tests would use them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel

from leveret.consumer import JobContext, Reject, Worker
from leveret.consumer.delivery.middleware import CallNext
from leveret.testing import TestBroker, run_job


class Order(BaseModel):
    id: int
    amount: int


class Pool:
    opened = 0

    def __init__(self) -> None:
        Pool.opened += 1


class Session:
    def __init__(self, name: str) -> None:
        self.name = name
        self.charged: list[int] = []


def _app() -> tuple[Worker, list[str]]:
    worker = Worker()
    seen: list[str] = []

    @worker.resource(scope="process")
    async def pool() -> AsyncIterator[Pool]:
        yield Pool()

    @worker.resource(scope="job")
    async def session(pool: Pool) -> AsyncIterator[Session]:
        s = Session("real")
        try:
            yield s
        finally:
            seen.append("real session closed")

    @worker.middleware
    async def tag(ctx: JobContext, call_next: CallNext) -> Any:
        seen.append(f"mw {ctx.job} attempt={ctx.attempt}")
        return await call_next(ctx)

    @worker.job("charge", queue="billing", max_attempts=3, backoff=60)
    async def charge(order: Order, session: Session, ctx: JobContext) -> str:
        if order.amount < 0:
            raise Reject("negative amount")
        if order.amount == 13 and ctx.attempt < 3:
            raise ConnectionError("gateway flaked")
        if order.amount == 666:
            raise ConnectionError("gateway down")
        session.charged.append(order.id)
        if order.amount > 100:
            await ctx.enqueue("receipt", {"id": order.id, "amount": order.amount})
        return f"{session.name}:{order.id}"

    @worker.job("receipt", queue="billing")
    def receipt(order: Order, ctx: JobContext) -> str:  # a plain def handler, on a thread
        seen.append(f"receipt {order.id} {ctx.headers.get('traceparent', '-')}")
        return "sent"

    return worker, seen


async def test_run_job_with_an_override_never_opens_what_it_replaces() -> None:
    worker, seen = _app()
    fake = Session("fake")
    Pool.opened = 0
    assert await run_job(worker, "charge", Order(id=1, amount=5), overrides={Session: fake}) == (
        "fake:1"
    )
    assert fake.charged == [1]
    assert Pool.opened == 0  # only the overridden session needed the pool
    assert seen == ["mw charge attempt=1"]  # the middleware chain ran; no real session
    # without the override: the real resources, opened and closed
    assert await run_job(worker, "charge", {"id": 2, "amount": 5}) == "real:2"
    assert Pool.opened == 1 and seen[-1] == "real session closed"
    # what the handler raised is raised; attempt= reaches ctx
    with pytest.raises(ConnectionError):
        await run_job(worker, "charge", Order(id=3, amount=13), overrides={Session: fake})
    assert await run_job(worker, "charge", Order(id=3, amount=13), attempt=3) == "real:3"
    with pytest.raises(LookupError, match="no job 'nope'"):
        await run_job(worker, "nope", {})


async def test_test_broker_runs_retries_and_dead_letters_without_waiting() -> None:
    worker, seen = _app()
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    started = time.monotonic()
    async with TestBroker(worker) as broker:
        await broker.publish("charge", Order(id=1, amount=13))  # fails twice, then succeeds
        await broker.publish("charge", Order(id=2, amount=666))  # exhausts its 3 attempts
        await broker.publish("charge", Order(id=3, amount=-1))  # rejected at once
        await broker.publish("charge", {"id": "x"})  # invalid payload
        await broker.publish("refund", {"id": 1})  # nobody handles it
        await broker.publish("charge", Order(id=4, amount=500), headers={"traceparent": tp})
        await broker.join()
    assert time.monotonic() - started < 5  # the 60 s backoffs were not waited out
    assert [(s.job, s.result, s.attempts) for s in broker.succeeded] == [
        ("charge", "real:4", 1),
        ("receipt", "sent", 1),  # the follow-up enqueued by charge 4
        ("charge", "real:1", 3),
    ]
    assert [(d.job, d.reason, d.attempts) for d in broker.dead] == [
        ("charge", "rejected", 1),
        ("charge", "invalid", 0),
        ("refund", "unknown_job", 0),
        ("charge", "exhausted", 3),
    ]
    assert broker.dead[-1].error == "ConnectionError: gateway down"
    assert [(r.attempt, r.delay_s) for r in broker.retries] == [(1, 60.0), (1, 60.0), (2, 60.0),
                                                                 (2, 60.0)]  # fmt: skip
    assert f"receipt 4 {tp}" in seen  # the chained job kept the trace
    assert seen.count("real session closed") == 8  # every run's session closed, failed or not


async def test_examples_demo_app_with_the_test_kit() -> None:
    """The project's own example app, tested the way its README says."""
    from examples.demo_app import worker

    async with TestBroker(worker) as broker:
        await broker.publish("send_email", {"to": "flaky@example.com", "subject": "hi"})
        await broker.publish("send_email", {"to": "bob@invalid", "subject": "hi"})
        await broker.publish("resize_image", {"image": "a.png", "width": 0})
        await broker.publish("resize_image", {"image": "b.png", "width": 10})
        await broker.join()
    assert sorted((s.job, s.attempts) for s in broker.succeeded) == [
        ("resize_image", 1),
        ("send_email", 2),
    ]
    assert sorted((d.job, d.reason) for d in broker.dead) == [
        ("resize_image", "exhausted"),
        ("send_email", "rejected"),
    ]
    assert await run_job(worker, "send_email", {"to": "a@example.com", "subject": "s"}) is None
