"""The middleware chain: order, the result flowing back, exceptions as the run's outcome."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import structlog
from pydantic import BaseModel

from leveret.consumer import ConfigError, JobContext, Reject, Worker
from leveret.consumer.delivery.execution import build_chain, run
from leveret.consumer.delivery.middleware import CallNext, JobMetrics, compose
from leveret.consumer.registry import Registry
from leveret.consumer.runtime.threads import JobThreads
from leveret.producers import Publisher
from tests.support import Broker, running, unique, wait_for


class Payload(BaseModel):
    n: int


class _Counter:
    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1


def _ctx(payload: Any = None) -> JobContext:
    return JobContext("id-1", "j", "q", 1, 3, structlog.get_logger(), payload=payload)


def _recorder(name: str, seen: list[str]) -> Any:
    async def mw(ctx: JobContext, call_next: CallNext) -> Any:
        seen.append(f"{name}>")
        try:
            return await call_next(ctx)
        finally:
            seen.append(f"<{name}")

    return mw


async def test_compose_runs_layers_outermost_first_and_returns_the_result() -> None:
    seen: list[str] = []

    async def handler(ctx: JobContext) -> int:
        seen.append("handler")
        return 42

    async def positional_only(ctx: JobContext, nxt: CallNext, /) -> Any:
        seen.append("p>")
        return await nxt(ctx) + 1

    chain = compose([_recorder("a", seen), _recorder("b", seen), positional_only], handler)
    assert await chain(_ctx()) == 43
    assert seen == ["a>", "b>", "p>", "handler", "<b", "<a"]


async def test_an_exception_from_a_layer_or_the_handler_is_the_runs_outcome() -> None:
    seen: list[str] = []

    async def failing(ctx: JobContext) -> None:
        raise ValueError("handler failed")

    async def swallow(ctx: JobContext, call_next: CallNext) -> str:
        try:
            return await call_next(ctx)  # type: ignore[no-any-return]
        except ValueError:
            return "recovered"

    async def refuse(ctx: JobContext, call_next: CallNext) -> Any:
        raise Reject("not today")

    # Let through: the handler's exception reaches the outside, the outer layers saw it pass.
    result, error = await run(compose([_recorder("a", seen)], failing), _ctx())
    assert result is None and isinstance(error, ValueError) and seen == ["a>", "<a"]
    # A layer that handles it turns the run into a success with its own result.
    assert await run(compose([swallow], failing), _ctx()) == ("recovered", None)
    # A layer that raises before call_next: the handler never runs, the exception is the outcome.
    ran: list[int] = []

    async def handler(ctx: JobContext) -> None:
        ran.append(1)

    _, error = await run(compose([refuse], handler), _ctx())
    assert isinstance(error, Reject) and not ran


async def test_the_built_in_layers_wrap_the_user_ones_and_the_timeout_is_innermost() -> None:
    """log context and metrics are outside user middleware; the timeout is inside it, so a slow
    middleware does not eat the handler's time, and a timeout says what overran."""
    registry = Registry()
    seen: list[str] = []

    async def slow_mw(ctx: JobContext, call_next: CallNext) -> Any:
        seen.append(f"in_progress={started.value}")
        await asyncio.sleep(0.2)  # longer than the timeout: must not count
        return await call_next(ctx)

    async def handler(p: Payload, ctx: JobContext) -> int:
        await asyncio.sleep(0.01)
        return p.n * 2

    async def hangs(p: Payload) -> None:
        await asyncio.sleep(10)

    spec = registry.add(handler, "double", "q", 3, 1.0, 0.1)
    started, in_progress = _Counter(), _Counter()
    threads = JobThreads(1)
    try:
        chain = build_chain(spec, [slow_mw], JobMetrics(started, in_progress), threads)
        with structlog.testing.capture_logs() as logs:
            ctx = _ctx(Payload(n=21))
            assert await run(chain, ctx) == (42, None)
        assert seen == ["in_progress=1"]  # metrics (outer) counted before the user layer ran
        assert (started.value, in_progress.value) == (1, 0)
        assert logs == []  # nothing logged; the binding is checked below
        assert structlog.contextvars.get_contextvars()["job_id"] == "id-1"

        spec = registry.add(hangs, "hangs", "q", 3, 1.0, 0.1)
        chain = build_chain(spec, [], JobMetrics(started, in_progress), threads)
        _, error = await run(chain, _ctx(Payload(n=1)))
        assert isinstance(error, TimeoutError)
        assert "overran its timeout of 0.1 s" in str(error)
        assert in_progress.value == 0
    finally:
        threads.shutdown()
        structlog.contextvars.clear_contextvars()


def test_a_middleware_must_be_an_async_function_of_ctx_and_call_next() -> None:
    worker = Worker()

    def not_async(ctx: JobContext, call_next: CallNext) -> None: ...

    async def one_arg(ctx: JobContext) -> None: ...

    with pytest.raises(ConfigError):
        worker.middleware(not_async)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        worker.middleware(one_arg)  # type: ignore[arg-type]


async def test_registered_middleware_wraps_every_run_in_order(broker: Broker, registry) -> None:
    """Through the worker: the first registered is outermost, the handler's result comes back
    through every layer, and an exception a layer raises is the run's outcome (a Reject
    dead-letters, anything else retries)."""
    worker = Worker(broker.settings(), registry=registry)
    queue = unique("mw")
    seen: list[tuple[str, Any]] = []

    @worker.middleware
    async def outer(ctx: JobContext, call_next: CallNext) -> Any:
        seen.append(("outer>", ctx.payload.n))
        result = await call_next(ctx)
        seen.append(("<outer", result))
        return result

    @worker.middleware
    async def inner(ctx: JobContext, call_next: CallNext) -> Any:
        seen.append(("inner>", ctx.attempt))
        if ctx.payload.n == 13:
            raise Reject("unlucky")
        if ctx.payload.n == 7 and ctx.attempt == 1:
            raise RuntimeError("first try fails")
        result = await call_next(ctx)
        seen.append(("<inner", result))
        return result

    @worker.job(f"{queue}-job", queue=queue, max_attempts=2, backoff=0)
    async def handle(p: Payload) -> int:
        seen.append(("handler", p.n))
        return p.n * 10

    async with running(worker), Publisher(broker.url) as pub:
        await pub.publish(f"{queue}-job", {"n": 1})
        await wait_for(lambda: ("<outer", 10) in seen, 10, "the first job")
        order = [("outer>", 1), ("inner>", 1), ("handler", 1), ("<inner", 10), ("<outer", 10)]
        assert seen == order
        seen.clear()
        await pub.publish(f"{queue}-job", {"n": 13})
        await wait_for(lambda: broker.depth(f"{queue}.dlq"), 10, "the rejected job")
        assert ("handler", 13) not in seen
        await pub.publish(f"{queue}-job", {"n": 7})
        await wait_for(lambda: ("handler", 7) in seen, 10, "the retried job")
    [dead] = broker.get_messages(f"{queue}.dlq")
    assert dead["properties"]["headers"]["x-reason"] == "rejected"
    assert "unlucky" in dead["properties"]["headers"]["x-error"]
    assert ("inner>", 2) in seen  # the failure in a layer burnt attempt 1: the job retried
    outcome = {"queue": queue, "job_name": f"{queue}-job"}
    assert (
        registry.get_sample_value("leveret_jobs_completed_total", {**outcome, "outcome": "retried"})
        == 1
    )
