"""Resources, middleware and headers wired into a real worker on the real broker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import structlog
from pydantic import BaseModel

from leveret.consumer import JobContext, Reject, Worker
from leveret.consumer.delivery.middleware import CallNext
from leveret.producers import Publisher
from tests.support import Broker, assert_queue_types, running, unique, wait_for


async def _depth_is(broker: Broker, queue: str, n: int) -> bool:
    return await broker.depth(queue) == n


class P(BaseModel):
    n: int


class Pool:
    def __init__(self) -> None:
        self.closed = False


class Session:
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.closed = False


class Tx:
    def __init__(self, session: Session) -> None:
        self.session = session


async def test_scope_lifetimes_and_reverse_close_order(
    broker: Broker, registry, queue_type: str
) -> None:
    """The process resource lives from start to stop; job resources per job, closed in
    reverse order of opening, after the handler, with the handler's exception thrown in."""
    worker = Worker(broker.settings(), registry=registry)
    queue = unique("res")
    events: list[str] = []

    @worker.resource(scope="process")
    async def pool() -> AsyncIterator[Pool]:
        events.append("pool open")
        p = Pool()
        yield p
        p.closed = True
        events.append("pool close")

    @worker.resource(scope="job")
    async def session(pool: Pool, ctx: JobContext) -> AsyncIterator[Session]:
        assert not pool.closed
        events.append(f"session open {ctx.job_id}")
        s = Session(ctx.job_id)
        try:
            yield s
        except ValueError:
            events.append(f"session rollback {ctx.job_id}")
            raise
        finally:
            s.closed = True
            events.append(f"session close {ctx.job_id}")

    @worker.resource(scope="job")
    def tx(session: Session) -> Iterator[Tx]:
        events.append(f"tx open {session.job_id}")
        yield Tx(session)
        events.append(f"tx close {session.job_id}")

    @worker.job(f"{queue}-j", queue=queue, max_attempts=1)
    async def handle(p: P, t: Tx, ctx: JobContext) -> None:
        assert t.session.job_id == ctx.job_id and not t.session.closed
        events.append(f"handler {ctx.job_id}")
        if p.n == 1:
            raise ValueError("boom")

    async with running(worker):
        assert events == ["pool open"]  # eagerly, at start
        assert_queue_types(broker, queue, queue_type)
        async with Publisher(broker.url) as pub:
            await pub.publish(f"{queue}-j", {"n": 0}, job_id="ok")
            await wait_for(lambda: "session close ok" in events, 10, "first job")
            await pub.publish(f"{queue}-j", {"n": 1}, job_id="bad")
            await wait_for(lambda: "session close bad" in events, 10, "second job")
        assert "pool close" not in events
    assert events == [
        "pool open",
        "session open ok", "tx open ok", "handler ok", "tx close ok", "session close ok",
        "session open bad", "tx open bad", "handler bad", "session rollback bad",
        "session close bad",  # tx's finalizer is skipped: a generator given an exception re-raises
        "pool close",
    ]  # fmt: skip
    await wait_for(lambda: _depth_is(broker, f"{queue}.dlq", 1), 10, "bad job dead")


async def test_no_job_sees_another_jobs_instance_under_prefetch_50(
    broker: Broker, registry
) -> None:
    worker = Worker(broker.settings(prefetch=50), registry=registry)
    queue = unique("leak")
    mismatches: list[str] = []
    seen: set[int] = set()  # serial numbers of the instances handlers got
    serial = 0
    open_now = 0
    most_open = 0

    @worker.resource(scope="job")
    async def session(ctx: JobContext) -> AsyncIterator[Session]:
        nonlocal open_now, most_open, serial
        open_now += 1
        most_open = max(most_open, open_now)
        s = Session(ctx.job_id)
        serial += 1
        s.serial = serial  # type: ignore[attr-defined]
        yield s
        s.closed = True
        open_now -= 1

    @worker.job(f"{queue}-j", queue=queue)
    async def handle(p: P, s: Session, ctx: JobContext) -> None:
        await asyncio.sleep(0.05)  # many jobs overlap
        if s.job_id != ctx.job_id or s.closed or s.serial in seen:  # type: ignore[attr-defined]
            mismatches.append(ctx.job_id)
        seen.add(s.serial)  # type: ignore[attr-defined]

    async with running(worker):
        async with Publisher(broker.url) as pub:
            await pub.publish_many([(f"{queue}-j", {"n": i}) for i in range(300)])
        await wait_for(lambda: len(seen) == 300, 30, "300 jobs")
    assert mismatches == []
    assert most_open > 10  # they really ran concurrently
    assert open_now == 0


async def test_a_failing_close_is_logged_and_counted_and_the_outcome_stands(
    broker: Broker, registry
) -> None:
    worker = Worker(broker.settings(), registry=registry)
    queue = unique("close")
    ran: list[int] = []

    @worker.resource(scope="job")
    async def session() -> AsyncIterator[Session]:
        yield Session("x")
        raise OSError("connection reset while closing")

    @worker.job(f"{queue}-j", queue=queue)
    async def handle(p: P, s: Session) -> None:
        ran.append(p.n)

    with structlog.testing.capture_logs() as logs:
        async with running(worker):
            async with Publisher(broker.url) as pub:
                await pub.publish(f"{queue}-j", {"n": 1})
            labels = {"queue": queue, "job_name": f"{queue}-j", "outcome": "succeeded"}
            await wait_for(
                lambda: registry.get_sample_value("leveret_jobs_completed_total", labels), 10, "ok"
            )
    assert ran == [1]
    assert (
        registry.get_sample_value(
            "leveret_resource_close_failures_total",
            {
                "resource": "test_a_failing_close_is_logged_and_"
                "counted_and_the_outcome_stands.<locals>.session"
            },
        )
        == 1
    )
    assert any("connection reset while closing" in str(e) for e in logs if "close" in e["event"])
    retried = {"queue": queue, "job_name": f"{queue}-j", "outcome": "retried"}
    assert not registry.get_sample_value("leveret_jobs_completed_total", retried)


async def test_middleware_order_and_exception_flow_with_resources(broker: Broker, registry) -> None:
    """Outermost first; a middleware sees the job scope's exception and may turn the outcome
    (a Reject from a layer dead-letters at once); resources close before middleware returns."""
    worker = Worker(broker.settings(), registry=registry)
    queue = unique("mw")
    seen: list[str] = []

    @worker.middleware
    async def outer(ctx: JobContext, call_next: CallNext) -> Any:
        seen.append(f"outer> {ctx.payload.n}")
        try:
            return await call_next(ctx)
        except KeyError as exc:
            seen.append(f"outer saw {exc!r}")
            raise Reject("translated") from exc
        finally:
            seen.append("<outer")

    @worker.middleware
    async def inner(ctx: JobContext, call_next: CallNext) -> Any:
        seen.append("inner>")
        result = await call_next(ctx)
        seen.append(f"<inner {result}")
        return result

    @worker.resource(scope="job")
    async def session() -> AsyncIterator[Session]:
        seen.append("session>")
        yield Session("s")
        seen.append("<session")

    @worker.job(f"{queue}-j", queue=queue, max_attempts=5)
    async def handle(p: P, s: Session) -> int:
        seen.append("handler")
        if p.n == 1:
            raise KeyError("missing")
        return p.n * 10

    async with running(worker):
        async with Publisher(broker.url) as pub:
            await pub.publish(f"{queue}-j", {"n": 2})
            await wait_for(lambda: "<outer" in seen, 10, "first run")
            first, seen[:] = list(seen), []
            await pub.publish(f"{queue}-j", {"n": 1})
            await wait_for(lambda: "<outer" in seen, 10, "second run")
        await wait_for(lambda: _depth_is(broker, f"{queue}.dlq", 1), 10, "rejected")
    assert first == ["outer> 2", "inner>", "session>", "handler", "<session", "<inner 20", "<outer"]
    assert seen == ["outer> 1", "inner>", "session>", "handler", "outer saw KeyError('missing')",
                    "<outer"]  # fmt: skip
    dead = broker.get_messages(f"{queue}.dlq")[0]["properties"]["headers"]
    assert dead["x-reason"] == "rejected" and dead["x-attempts"] == 1


async def test_publish_headers_reach_ctx_headers_as_str_on_every_attempt(
    broker: Broker, registry
) -> None:
    worker = Worker(broker.settings(), registry=registry)
    queue = unique("hdr")
    seen: list[tuple[int, dict[str, str]]] = []
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    @worker.job(f"{queue}-j", queue=queue, max_attempts=2, backoff=0.1)
    async def handle(p: P, ctx: JobContext) -> None:
        seen.append((ctx.attempt, dict(ctx.headers)))
        if ctx.attempt == 1:
            raise ConnectionError("first attempt fails")

    async with running(worker):
        async with Publisher(broker.url) as pub:
            await pub.publish(
                f"{queue}-j", {"n": 1}, headers={"traceparent": traceparent, "tenant": "acme"}
            )
        await wait_for(lambda: len(seen) == 2, 15, "the retry")
    want = {"traceparent": traceparent, "tenant": "acme"}
    assert seen == [(1, want), (2, want)]  # x-attempts is ctx.attempt's business, not a header
    assert all(type(v) is str for _, h in seen for v in h.values())
