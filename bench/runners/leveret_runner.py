"""Leveret as users run it: the real ``consumer.Worker`` and ``producers.Publisher``.

Defaults stay on: pydantic validation of every body, Prometheus metrics (served on a free port),
structlog JSON at info level (stderr, which the harness keeps in a log file), confirmed retries
through the delay chain, acks only after the outcome is durable.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel

from bench.runners.common import Tally, load_spec, say, shares_queue, wait_go
from bench.wire import payload
from leveret.consumer import JobContext, Worker, WorkerSettings
from leveret.consumer.logging import configure_logging
from leveret.producers import Publisher
from leveret.producers.broker.connection import connect
from leveret.producers.settings import ConnectionSettings
from leveret.topology.declare import declare


class Conn:
    """What a job-scoped resource typically hands a handler (a session, a transaction)."""

    __slots__ = ()


async def conn() -> AsyncIterator[Conn]:
    """The ``job_resource`` option: one job-scoped async-generator resource per job."""
    yield Conn()


class Item(BaseModel):
    i: int
    ts: float
    pad: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_worker(spec: dict[str, Any], tally: Tally | None) -> Worker:
    settings = WorkerSettings(
        amqp_url=spec["url"],
        prefetch=spec.get("prefetch", 50),
        metrics_port=free_port(),
        metrics_host="127.0.0.1",
        shutdown_grace=10,
        # Lifecycle options of the leveret-outcomes/-status rows (bench/harness.py; the status URL
        # comes from the harness); without them the defaults: events off, no status store.
        **{k: spec[k] for k in ("events", "status_url", "status_ttl") if k in spec},
    )
    worker = Worker(settings)
    register_jobs(worker, spec, tally)
    return worker


def register_jobs(worker: Worker, spec: dict[str, Any], tally: Tally | None) -> None:
    """The bench job and its handler, on ``worker``: the in-process rows and the app the
    ``leveret-cli`` rows load through the real CLI (``bench.runners.leveret_app``) share it.

    Job options of the feature rows: ``lock`` (``leveret-lock``: a template over ``Item``'s
    fields, ``"{i}"`` a key per job) and ``rate_limit`` (``leveret-ratelimit``); absent, none.
    """
    io_s = float(spec.get("io_s", 0.0))
    options = {k: spec[k] for k in ("lock", "rate_limit") if spec.get(k)}
    register = worker.job(
        spec["job"],
        queue=spec["queue"],
        max_attempts=3,
        backoff=spec.get("backoff_s", 1.0),
        **options,
    )
    if spec.get("job_resource"):  # the leveret-resource row: the job scope's own cost
        worker.resource(scope="job")(conn)

        @register
        async def handle_with(item: Item, ctx: JobContext, c: Conn) -> None:
            assert tally is not None
            if tally.start({"i": item.i, "ts": item.ts}):
                raise RuntimeError("first attempt fails on purpose")
            if io_s:
                await asyncio.sleep(io_s)
            tally.end()

        return

    @register
    async def handle(item: Item, ctx: JobContext) -> None:
        assert tally is not None
        if tally.start({"i": item.i, "ts": item.ts}):
            raise RuntimeError("first attempt fails on purpose")
        if io_s:
            await asyncio.sleep(io_s)
        tally.end()


async def declare_topology(spec: dict[str, Any], worker: Worker) -> None:
    connection = await connect(worker.settings, robust=False)
    try:
        await declare(connection, worker.topology)
    finally:
        await connection.close()


async def publish(spec: dict[str, Any]) -> None:
    worker = make_worker(spec, None)
    await declare_topology(spec, worker)
    say("READY")
    await asyncio.to_thread(wait_go)
    n, job, kind = spec["n"], spec["job"], spec["workload"]
    loop = asyncio.get_running_loop()
    async with Publisher(settings=ConnectionSettings(amqp_url=spec["url"])) as pub:
        started = loop.time()
        if kind == "publish_seq":
            for i in range(n):
                await pub.publish(job, payload(i))
        elif kind == "publish_pipelined":
            numbers = iter(range(n))

            async def lane() -> None:
                for i in numbers:
                    await pub.publish(job, payload(i))

            await asyncio.gather(*(lane() for _ in range(spec["window"])))
        else:
            batch = spec["batch"]
            for first in range(0, n, batch):
                await pub.publish_many(
                    (job, payload(i)) for i in range(first, min(n, first + batch))
                )
        elapsed = loop.time() - started
    say("RESULT", elapsed=elapsed, n=n)


def publish_blocking(spec: dict[str, Any]) -> None:
    from leveret.producers import BlockingPublisher

    worker = make_worker(spec, None)
    asyncio.run(declare_topology(spec, worker))
    say("READY")
    wait_go()
    import time

    n, job = spec["n"], spec["job"]
    with BlockingPublisher(settings=ConnectionSettings(amqp_url=spec["url"])) as pub:
        started = time.perf_counter()
        if spec["workload"] == "publish_seq":
            for i in range(n):
                pub.publish(job, payload(i))
        else:
            batch = spec["batch"]
            for first in range(0, n, batch):
                pub.publish_many([(job, payload(i)) for i in range(first, min(n, first + batch))])
        elapsed = time.perf_counter() - started
    say("RESULT", elapsed=elapsed, n=n)


async def consume(spec: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    worker: Worker | None = None

    def done() -> None:
        assert worker is not None
        loop.call_soon_threadsafe(worker.stop)

    tally = Tally(spec, done)
    worker = make_worker(spec, tally)
    await declare_topology(spec, worker)
    say("READY")
    await asyncio.to_thread(wait_go)
    tally.go()
    task = asyncio.create_task(worker.run())
    while not worker.ready:
        if task.done():  # failed (raises), or already finished every job and stopped
            task.result()
            break
        await asyncio.sleep(0.005)
    say("CONSUMING")
    if shares_queue(spec):
        tally.watch_idle()
    await task  # stop() → graceful shutdown: in-flight jobs finish, last acks are flushed
    say("RESULT", **tally.result())


def main() -> None:
    spec = load_spec()
    configure_logging("info", json=True)
    if spec.get("blocking"):
        publish_blocking(spec)
        return
    coro = publish(spec) if spec["workload"].startswith("publish") else consume(spec)
    if spec.get("uvloop"):
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    main()
