"""Issue 14: dishka against the hand-written resolver (consumer/features/resources.py), per job.

One "job" = enter a job (REQUEST) scope with the job's JobContext, resolve one job-scoped
async-generator resource that depends on a process (APP) scoped resource and on JobContext,
and close the scope (which runs the generator's finalizer). Both sides do exactly that, inside
one running event loop; each sample times a batch of ``BATCH`` jobs and divides; the figure is the
median of ``SAMPLES`` samples. ``python -m bench.di_eval`` prints the table in DI_EVAL.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from dishka import Provider, Scope, make_async_container

from leveret.consumer.context import JobContext
from leveret.consumer.features.resources import Resources

BATCH = 5000
SAMPLES = 25


class Pool:
    """Stands for a connection pool: created once per process."""


class Session:
    def __init__(self, pool: Pool, job_id: str) -> None:
        self.pool = pool
        self.job_id = job_id
        self.closed = False


async def pool() -> AsyncIterator[Pool]:
    yield Pool()


async def session(p: Pool, ctx: JobContext) -> AsyncIterator[Session]:
    s = Session(p, ctx.job_id)
    try:
        yield s
    finally:
        s.closed = True


async def handler(payload: dict[str, int], s: Session) -> None:
    return None


def make_ctx() -> JobContext:
    return JobContext(
        job_id="j1",
        job="charge",
        queue="billing",
        attempt=1,
        max_attempts=3,
        log=structlog.get_logger("bench"),
    )


async def sample(one: Callable[[], Awaitable[None]]) -> float:
    """µs per job over one batch."""
    t0 = time.thread_time()
    for _ in range(BATCH):
        await one()
    return (time.thread_time() - t0) / BATCH * 1e6


async def measure(variants: dict[str, Callable[[], Awaitable[None]]]) -> dict[str, float]:
    """Median µs/job of each variant; samples interleaved so a loaded machine hits all alike."""
    for one in variants.values():  # warm-up
        for _ in range(BATCH):
            await one()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(SAMPLES):
        for name, one in variants.items():
            samples[name].append(await sample(one))
    return {name: statistics.median(xs) for name, xs in samples.items()}


async def main() -> dict[str, float]:
    ctx = make_ctx()
    payload = {"x": 1}

    # -- no DI at all: the floor ---------------------------------------------------------------
    async def bare() -> None:
        await handler(payload, Session(Pool(), ctx.job_id))

    p0 = Pool()

    async def raw_generator() -> None:  # the resource's own lifecycle, no resolver: the floor
        g = session(p0, ctx)
        s = await g.__anext__()
        await handler(payload, s)
        with contextlib.suppress(StopAsyncIteration):
            await g.__anext__()

    # -- dishka ----------------------------------------------------------------------------------
    provider = Provider()
    provider.provide(pool, scope=Scope.APP)
    provider.provide(session, scope=Scope.REQUEST)
    provider.from_context(provides=JobContext, scope=Scope.REQUEST)
    container = make_async_container(provider)
    await container.get(Pool)  # APP scope opened once, as a worker would at start

    async def with_dishka() -> None:
        async with container(context={JobContext: ctx}) as request:
            s = await request.get(Session)
            await handler(payload, s)

    # -- hand-written ------------------------------------------------------------------------------
    resources = Resources()
    resources.add(pool, scope="process")
    resources.add(session, scope="job")
    plan = resources.plan(handler)

    async def with_resources() -> None:
        async with resources.job_scope(plan, ctx) as kwargs:
            await handler(payload, **kwargs)

    async def no_resources() -> None:  # a handler that needs nothing: the trivial plan
        async with resources.job_scope(trivial, ctx) as kwargs:
            await handler_plain(payload, **kwargs)

    async def handler_plain(payload: dict[str, int]) -> None:
        return None

    trivial = resources.plan(handler_plain)
    assert trivial.trivial

    async with resources.process_scope():
        out = await measure(
            {
                "no DI (handler called directly)": bare,
                "async generator driven by hand": raw_generator,
                "dishka 1.10 REQUEST scope": with_dishka,
                "leveret Resources job_scope": with_resources,
                "leveret Resources, trivial plan": no_resources,
            }
        )
    await container.close()
    return out


if __name__ == "__main__":
    results = asyncio.run(main())
    print(f"python {sys.version.split()[0]}, batch {BATCH}, {SAMPLES} samples, median µs/job")
    for k, v in results.items():
        print(f"  {k:40s} {v:7.2f}")
