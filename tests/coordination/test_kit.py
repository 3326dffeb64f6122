"""Coordination without a broker: the registry's checks, and TestBroker's locks, done marks,
retry rules and expiry in memory."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from pydantic import BaseModel

from leveret import Retry
from leveret.consumer import ConfigError, JobContext, Worker
from leveret.consumer.features.locks import MemoryLocks, require_redis
from leveret.testing import TestBroker, run_job

from .conftest import job


class Charge(BaseModel):
    customer_id: int
    order_id: str


async def test_lock_serialises_and_hands_out_growing_tokens() -> None:
    worker = Worker()
    tokens: list[int | None] = []

    @job(worker, "charge", lock="customer:{customer_id}")
    async def charge(c: Charge, ctx: JobContext) -> None:
        tokens.append(ctx.lock_token)

    async with TestBroker(worker) as broker:
        for i in range(3):
            await broker.publish("charge", Charge(customer_id=1, order_id=str(i)))
        await broker.join()
        assert not broker.memory.locks.held  # released after each run
    assert len(broker.succeeded) == 3 and broker.postponed == 0
    assert tokens == sorted(tokens) and len(set(tokens)) == 3


async def test_memory_locks_exclude_until_released_or_expired() -> None:
    locks = MemoryLocks()
    token = await locks.acquire("k", "a", 0.05)
    assert token is not None
    assert await locks.acquire("k", "b", 0.05) is None
    assert await locks.renew("k", "a", token, 0.05)
    await asyncio.sleep(0.06)
    second = await locks.acquire("k", "b", 10)
    assert second is not None and second > token
    assert not await locks.renew("k", "a", token, 1)  # taken since: the old holder is told


async def test_a_held_lock_postpones_without_burning_an_attempt() -> None:
    worker = Worker()
    attempts: list[int] = []

    @job(worker, "charge", lock="{customer_id}")
    async def charge(c: Charge, ctx: JobContext) -> None:
        attempts.append(ctx.attempt)

    async with TestBroker(worker) as broker:
        # Someone else holds customer 5 for a moment.
        await broker.memory.locks.acquire("5", "elsewhere", 0.8)
        await broker.publish("charge", Charge(customer_id=5, order_id="x"))
        await broker.join()
    assert attempts == [1] and broker.postponed >= 1 and not broker.retries


async def test_idempotency_key_skips_and_returns_the_first_result() -> None:
    worker = Worker()
    runs: list[str] = []

    @job(worker, "charge", idempotency_key="{order_id}")
    async def charge(c: Charge) -> dict[str, str]:
        runs.append(c.order_id)
        return {"receipt": f"r-{c.order_id}-{len(runs)}"}

    async with TestBroker(worker) as broker:
        for _ in range(2):
            await broker.publish("charge", Charge(customer_id=1, order_id="o1"))
        await broker.publish("charge", Charge(customer_id=1, order_id="o2"))
        await broker.join()
    assert runs == ["o1", "o2"]
    assert [s.result for s in broker.succeeded] == [
        {"receipt": "r-o1-1"},
        {"receipt": "r-o1-1"},
        {"receipt": "r-o2-2"},
    ]


async def test_ctx_done_before_and_mark_done() -> None:
    worker = Worker()
    sent: list[str] = []

    @worker.job("email")
    async def email(c: Charge, ctx: JobContext) -> None:
        key = f"receipt-mail:{c.order_id}"
        if await ctx.done_before(key):
            return
        sent.append(c.order_id)
        await ctx.mark_done(key)

    async with TestBroker(worker) as broker:
        for _ in range(3):
            await broker.publish("email", Charge(customer_id=1, order_id="o1"))
        await broker.join()
    assert sent == ["o1"] and len(broker.succeeded) == 3


async def test_retry_on_rejects_other_errors_and_retry_after_sets_the_delay() -> None:
    worker = Worker()

    @job(worker, "flaky", retry_on=(TimeoutError, ConnectionError), max_attempts=3)
    async def flaky(c: Charge, ctx: JobContext) -> None:
        if c.order_id == "timeout" and ctx.attempt == 1:
            raise TimeoutError("slow upstream")
        if c.order_id == "later" and ctx.attempt == 1:
            raise Retry(after=timedelta(seconds=30))
        if c.order_id == "bug":
            raise KeyError("a bug")

    async with TestBroker(worker) as broker:
        await broker.publish("flaky", Charge(customer_id=1, order_id="timeout"))
        await broker.publish("flaky", Charge(customer_id=1, order_id="later"))
        await broker.publish("flaky", Charge(customer_id=1, order_id="bug"))
        await broker.join()
    assert [(d.reason, d.attempts) for d in broker.dead] == [("rejected", 1)]
    assert "KeyError" in broker.dead[0].error
    delays = {r.job_id: r.delay_s for r in broker.retries}
    assert sorted(delays.values())[-1] == 30.0 and len(delays) == 2
    assert len(broker.succeeded) == 2


async def test_expired_jobs_do_not_run_in_the_test_broker() -> None:
    worker = Worker()
    ran: list[str] = []

    @worker.job("ping")
    async def ping(c: Charge) -> None:
        ran.append(c.order_id)

    async with TestBroker(worker) as broker:
        await broker.publish("ping", Charge(customer_id=1, order_id="late"), expires=0.05)
        await broker.publish("ping", Charge(customer_id=1, order_id="fine"), expires=60)
        await asyncio.sleep(0.06)
        await broker.join()
    assert ran == ["fine"]
    assert [(d.reason, d.payload.order_id) for d in broker.dead] == [("expired", "late")]


async def test_run_job_has_done_marks_and_a_lock() -> None:
    worker = Worker()

    @job(worker, "charge", lock="{customer_id}")
    async def charge(c: Charge, ctx: JobContext) -> tuple[bool, int | None]:
        await ctx.mark_done("k")
        return await ctx.done_before("k"), ctx.lock_token

    done, token = await run_job(worker, "charge", Charge(customer_id=1, order_id="o"))
    assert done and token == 1


def test_bad_options_are_refused_at_registration() -> None:
    worker = Worker()

    async def handler(c: Charge) -> None:
        pass

    with pytest.raises(ConfigError, match="not a field of Charge"):
        job(worker, "a", lock="{customer}")(handler)
    with pytest.raises(ConfigError, match="payload fields"):
        job(worker, "b", lock="{}")(handler)
    with pytest.raises(ConfigError, match="retry_on"):
        job(worker, "c", retry_on=("TimeoutError",))(handler)
    with pytest.raises(ValueError, match="after"):
        Retry(after=-1)


def test_idempotency_keys_need_redis_and_locks_do_not() -> None:
    worker = Worker()

    @job(worker, "charge", lock="{customer_id}")
    async def charge(c: Charge) -> None:
        pass

    require_redis(worker.jobs.jobs, None)  # lock= alone: on the broker (test_broker_locks.py)

    @job(worker, "refund", idempotency_key="{customer_id}")
    async def refund(c: Charge) -> None:
        pass

    with pytest.raises(ConfigError, match=r"refund use idempotency_key=.*LEVERET_STATUS_URL"):
        require_redis(worker.jobs.jobs, None)
    require_redis(worker.jobs.jobs, "redis://x")


async def test_done_before_without_redis_is_a_clear_error() -> None:
    ctx = JobContext("id", "job", "q", 1, 3, None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="LEVERET_STATUS_URL"):
        await ctx.done_before("k")


def test_expires_is_checked_before_anything_is_sent() -> None:
    from datetime import UTC, datetime

    from leveret.producers.wire.message import HEADER_EXPIRES_AT, expires_header
    from leveret.topology.errors import InvalidValueError

    at = datetime(2030, 1, 1, tzinfo=UTC)
    assert expires_header({"a": "b"}, at) == {
        "a": "b",
        HEADER_EXPIRES_AT: int(at.timestamp() * 1000),
    }
    assert expires_header(None, None) is None
    for bad in (0, -1, True, datetime(2030, 1, 1), "soon"):
        with pytest.raises(InvalidValueError):
            expires_header(None, bad)  # type: ignore[arg-type]


def test_a_worker_with_locks_and_no_redis_refuses_to_start() -> None:
    from leveret.consumer.runtime import startup

    worker = Worker()

    @job(worker, "charge", idempotency_key="{order_id}")
    async def charge(c: Charge) -> None:
        pass

    with pytest.raises(ConfigError, match=r"charge.*LEVERET_STATUS_URL"):
        startup.coordination(worker)
