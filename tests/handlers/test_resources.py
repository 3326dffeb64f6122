"""Scoped resources (issue 14 item 1): registration errors, lifetimes, isolation, close failures."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

import pytest
import structlog
import structlog.testing
from prometheus_client import CollectorRegistry

from leveret.consumer.context import JobContext
from leveret.consumer.errors import ConfigError
from leveret.consumer.features.resources import Resources


class Pool:
    def __init__(self) -> None:
        self.closed = False


class Session:
    def __init__(self, pool: Pool, job_id: str) -> None:
        self.pool = pool
        self.job_id = job_id
        self.closed = False
        self.saw: BaseException | None = None


class Cache:
    pass


class Tx:
    pass


class A:
    pass


class B:
    pass


class C:
    pass


class Unprovided:
    pass


def ctx_for(job_id: str) -> JobContext:
    return JobContext(
        job_id=job_id,
        job="charge",
        queue="billing",
        attempt=1,
        max_attempts=3,
        log=structlog.get_logger("test"),
    )


def failures(registry: CollectorRegistry, name: str) -> float:
    value = registry.get_sample_value("leveret_resource_close_failures_total", {"resource": name})
    return value or 0.0


# -- registration errors ---------------------------------------------------------------------


def test_two_resources_providing_one_type() -> None:
    res = Resources()

    def first() -> Pool:
        return Pool()

    def second() -> Pool:
        return Pool()

    res.add(first)
    with pytest.raises(ConfigError, match=r"'.*first'.*'.*second'.*both provide Pool"):
        res.add(second)


def test_missing_dependency_names_resource_and_parameter() -> None:
    res = Resources()

    def cache(thing: Unprovided) -> Cache:
        return Cache()

    res.add(cache)
    with pytest.raises(ConfigError, match=r"'.*cache'.*parameter 'thing' needs Unprovided"):
        res.check()

    async def handler(payload: dict[str, int], c: Cache) -> None: ...

    with pytest.raises(ConfigError, match=r"parameter 'thing' needs Unprovided"):
        res.plan(handler)


def test_cycle() -> None:
    res = Resources()

    def a(c: C) -> A:
        return A()

    def b(x: A) -> B:
        return B()

    def c(y: B) -> C:
        return C()

    for fn in (a, b, c):
        res.add(fn)
    with pytest.raises(
        ConfigError, match=r"circular dependency.*\.a -> .*\.c -> .*\.b -> .*\.a'?$"
    ):
        res.check()


def test_handler_parameter_nobody_provides() -> None:
    res = Resources()

    async def handler(payload: dict[str, int], thing: Unprovided) -> None: ...

    with pytest.raises(ConfigError, match=r"handler 'charge': parameter 'thing' \(Unprovided\)"):
        res.plan(handler, name="charge")


def test_process_resource_may_not_take_jobcontext_or_job_resource() -> None:
    res = Resources()

    def bad(ctx: JobContext) -> Pool:
        return Pool()

    with pytest.raises(ConfigError, match=r"process resource '.*bad'.*'ctx'.*JobContext"):
        res.add(bad, scope="process")

    def tx() -> Tx:
        return Tx()

    def cache(t: Tx) -> Cache:
        return Cache()

    res.add(tx, scope="job")
    res.add(cache, scope="process")
    with pytest.raises(ConfigError, match=r"process resource '.*cache'.*'t' needs job resource"):
        res.check()


def test_annotations_required() -> None:
    res = Resources()

    def no_return():  # type: ignore[no-untyped-def]
        return Pool()

    with pytest.raises(ConfigError, match="return annotation"):
        res.add(no_return)

    def untyped_param(p) -> Cache:  # type: ignore[no-untyped-def]
        return Cache()

    with pytest.raises(ConfigError, match=r"parameter 'p' needs a type annotation"):
        res.add(untyped_param)

    async def gen_wrong() -> Pool:  # type: ignore[misc]
        yield Pool()

    with pytest.raises(ConfigError, match="AsyncIterator"):
        res.add(gen_wrong)

    with pytest.raises(ConfigError, match="scope must be"):
        res.add(lambda: None, scope="request")  # type: ignore[arg-type]


def test_plan_shapes() -> None:
    res = Resources()

    def pool() -> Pool:
        return Pool()

    res.add(pool)

    async def plain(payload: dict[str, int]) -> None: ...

    async def legacy(payload: dict[str, int], ctx) -> None: ...  # type: ignore[no-untyped-def]

    async def annotated(payload: dict[str, int], p: Annotated[Pool, "meta"]) -> None: ...

    async def defaulted(payload: dict[str, int], x: int = 3) -> None: ...

    assert res.plan(plain).trivial
    assert res.plan(defaulted).trivial
    assert res.plan(legacy).wants_ctx and res.plan(legacy).parameters == ("ctx",)
    assert res.plan(annotated).parameters == ("p",)


# -- lifetimes ---------------------------------------------------------------------------------


async def test_lifetimes_and_reverse_close_order() -> None:
    events: list[str] = []
    res = Resources()

    @res.resource(scope="process")
    async def pool() -> AsyncIterator[Pool]:
        events.append("open pool")
        p = Pool()
        yield p
        p.closed = True
        events.append("close pool")

    @res.resource(scope="process")
    def cache(p: Pool) -> Iterator[Cache]:  # sync generator depending on an async one
        events.append("open cache")
        yield Cache()
        events.append("close cache")

    @res.resource(scope="job")
    async def session(p: Pool, ctx: JobContext) -> AsyncIterator[Session]:
        events.append(f"open session {ctx.job_id}")
        s = Session(p, ctx.job_id)
        try:
            yield s
        except BaseException as exc:
            s.saw = exc
            events.append(f"rollback session {ctx.job_id}")
            raise
        finally:
            s.closed = True
        events.append(f"close session {ctx.job_id}")

    @res.resource(scope="job")
    @contextlib.asynccontextmanager
    async def tx(s: Session) -> AsyncIterator[Tx]:
        events.append("open tx")
        yield Tx()
        events.append("close tx")

    async def handler(payload: dict[str, int], t: Tx, s: Session, c: Cache) -> str:
        events.append("handler")
        assert not s.closed
        return "ok"

    plan = res.plan(handler)
    assert events == []
    async with res.process_scope():
        assert events == ["open pool", "open cache"]  # eager, dependency order
        async with res.job_scope(plan, ctx_for("j1")) as kwargs:
            assert await handler({}, **kwargs) == "ok"
            session_1 = kwargs["s"]
        assert session_1.closed
        assert events[2:] == [
            "open session j1",
            "open tx",
            "handler",
            "close tx",
            "close session j1",
        ]
        del events[2:]
        with pytest.raises(ValueError, match="boom"):
            async with res.job_scope(plan, ctx_for("j2")) as kwargs:
                raise ValueError("boom")
        # the job's exception was thrown into the generator (a session can roll back)
        assert isinstance(kwargs["s"].saw, ValueError)
        assert events[2:] == ["open session j2", "open tx", "rollback session j2"]
        assert "close pool" not in events
    assert events[-2:] == ["close cache", "close pool"]


async def test_lazy_process_scope_and_failed_open_closes_the_rest() -> None:
    events: list[str] = []
    res = Resources()

    @res.resource(scope="process")
    async def pool() -> AsyncIterator[Pool]:
        events.append("open pool")
        yield Pool()
        events.append("close pool")

    @res.resource(scope="job")
    async def session(p: Pool, ctx: JobContext) -> AsyncIterator[Session]:
        events.append("open session")
        try:
            yield Session(p, ctx.job_id)
        finally:
            events.append("close session")

    @res.resource(scope="job")
    async def tx(s: Session) -> Tx:
        raise ConnectionError("db down")

    async def handler(payload: dict[str, int], t: Tx) -> None: ...

    async with res.process_scope(eager=False):
        assert events == []
        with pytest.raises(ConnectionError):  # a failing open is the job's outcome
            async with res.job_scope(res.plan(handler), ctx_for("j1")):
                pytest.fail("the handler must not run")
        assert events == ["open pool", "open session", "close session"]
    assert events[-1] == "close pool"


async def test_eager_open_failure_closes_opened_ones() -> None:
    events: list[str] = []
    res = Resources()

    @res.resource()
    async def pool() -> AsyncIterator[Pool]:
        yield Pool()
        events.append("close pool")

    @res.resource()
    def cache(p: Pool) -> Cache:
        raise RuntimeError("no cache")

    with pytest.raises(RuntimeError, match="no cache"):
        async with res.process_scope():
            pass
    assert events == ["close pool"]


async def test_fifty_concurrent_jobs_each_see_their_own_instance() -> None:
    res = Resources()
    live: set[str] = set()
    closed: list[str] = []

    @res.resource(scope="process")
    def pool() -> Pool:
        return Pool()

    @res.resource(scope="job")
    async def session(p: Pool, ctx: JobContext) -> AsyncIterator[Session]:
        s = Session(p, ctx.job_id)
        live.add(ctx.job_id)
        await asyncio.sleep(0)
        yield s
        await asyncio.sleep(0.001)
        live.discard(ctx.job_id)
        closed.append(s.job_id)

    @res.resource(scope="job")
    def tx(s: Session) -> Tx:
        t = Tx()
        t.session = s  # type: ignore[attr-defined]
        return t

    seen: dict[str, tuple[int, int]] = {}
    peak = 0

    async def handler(payload: dict[str, int], s: Session, t: Tx, ctx: JobContext) -> None:
        nonlocal peak
        peak = max(peak, len(live))
        for _ in range(5):  # interleave with the other jobs
            await asyncio.sleep(0.002)
            assert s.job_id == ctx.job_id
            assert t.session is s  # type: ignore[attr-defined]
        seen[ctx.job_id] = (id(s), id(s.pool))

    plan = res.plan(handler)

    async def one(i: int) -> None:
        ctx = ctx_for(f"job-{i}")
        async with res.job_scope(plan, ctx) as kwargs:
            await handler({}, **kwargs)

    async with res.process_scope():
        await asyncio.gather(*(one(i) for i in range(50)))
    assert peak > 1, "jobs did not overlap: the test proves nothing"
    assert len(seen) == 50
    assert len({s for s, _ in seen.values()}) == 50  # fifty distinct sessions
    assert len({p for _, p in seen.values()}) == 1  # one shared pool
    assert sorted(closed) == sorted(f"job-{i}" for i in range(50))
    assert not live


async def test_failing_close_is_logged_and_counted_and_the_outcome_stands() -> None:
    registry = CollectorRegistry()
    res = Resources(registry)
    closed: list[str] = []

    @res.resource(scope="job")
    async def session(ctx: JobContext) -> AsyncIterator[Session]:
        yield Session(Pool(), ctx.job_id)
        closed.append("session")

    @res.resource(scope="job")
    async def tx(s: Session) -> AsyncIterator[Tx]:
        yield Tx()
        raise OSError("commit lost")

    async def handler(payload: dict[str, int], t: Tx) -> str:
        return "done"

    plan = res.plan(handler)
    with structlog.testing.capture_logs() as logs:
        async with res.job_scope(plan, ctx_for("j1")) as kwargs:
            result = await handler({}, **kwargs)
        assert result == "done"  # the scope exit did not raise
        assert closed == ["session"]  # the failing close did not stop the next one
        assert failures(registry, tx.__qualname__) == 1

        # with the job failing, the job's own exception stands, not the close's
        with pytest.raises(KeyError, match="job's own"):
            async with res.job_scope(plan, ctx_for("j2")):
                raise KeyError("job's own")
        # tx re-raised the thrown KeyError: that is the job's error, not a close failure
        assert failures(registry, tx.__qualname__) == 1

    failed = [e for e in logs if e["event"] == "resource_close_failed"]
    assert len(failed) == 1
    assert failed[0]["resource"] == tx.__qualname__
    assert "commit lost" in failed[0]["error"]
    assert failed[0]["log_level"] == "error"


async def test_close_failure_while_job_failed_keeps_job_error() -> None:
    registry = CollectorRegistry()
    res = Resources(registry)

    @res.resource(scope="job")
    def tx() -> Iterator[Tx]:
        try:
            yield Tx()
        finally:
            raise OSError("close broke")  # replaces whatever was thrown in

    async def handler(payload: dict[str, int], t: Tx) -> None: ...

    with pytest.raises(ValueError, match="job failed"):
        async with res.job_scope(res.plan(handler), ctx_for("j1")):
            raise ValueError("job failed")
    assert failures(registry, tx.__qualname__) == 1


async def test_overrides_replace_resources_and_skip_their_dependencies() -> None:
    opened: list[str] = []
    res = Resources()

    @res.resource(scope="process")
    async def pool() -> AsyncIterator[Pool]:
        opened.append("pool")
        yield Pool()

    @res.resource(scope="job")
    async def session(p: Pool, ctx: JobContext) -> AsyncIterator[Session]:
        opened.append("session")
        yield Session(p, ctx.job_id)

    @res.resource(scope="job")
    def tx(s: Session) -> Tx:
        opened.append("tx")
        return Tx()

    async def handler(payload: dict[str, int], s: Session, t: Tx) -> tuple[Session, Tx]:
        return s, t

    fake = Session(Pool(), "fake")
    plan = res.plan(handler)
    async with (
        res.process_scope(eager=False, overrides={Session: fake}),
        res.job_scope(plan, ctx_for("j1")) as kwargs,
    ):
        s, t = await handler({}, **kwargs)
    assert s is fake and isinstance(t, Tx)
    assert opened == ["tx"]  # neither the real session nor the pool it needs was opened

    # per job, too
    fake_tx = Tx()
    opened.clear()
    async with (
        res.process_scope(eager=False),
        res.job_scope(plan, ctx_for("j2"), overrides={Tx: fake_tx}) as kwargs,
    ):
        s, t = await handler({}, **kwargs)
    assert t is fake_tx and s.job_id == "j2"
    assert opened == ["pool", "session"]


async def test_trivial_plan_enters_nothing() -> None:
    res = Resources()
    called: list[str] = []

    @res.resource(scope="job")
    def tx() -> Tx:
        called.append("tx")
        return Tx()

    async def plain(payload: dict[str, int]) -> None: ...

    async def with_ctx(payload: dict[str, int], ctx: JobContext) -> None: ...

    assert res.plan(plain).trivial
    async with res.job_scope(res.plan(plain), ctx_for("j1")) as kwargs:
        assert kwargs == {}
    ctx = ctx_for("j2")
    async with res.job_scope(res.plan(with_ctx), ctx) as kwargs:
        assert kwargs == {"ctx": ctx}
    assert called == []
