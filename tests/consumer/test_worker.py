"""The worker against a real broker: wire format, DLQ reasons, concurrency, reconnects.

Tests taking ``queue_type`` run on classic and on quorum queues (``LEVERET_QUEUE_TYPE``, set by
the fixture in tests/conftest.py); the priority test runs on classic only and says why.
"""

from __future__ import annotations

import asyncio
import threading
import time

import aio_pika
import pytest
import structlog
from pydantic import BaseModel
from structlog.testing import capture_logs

from leveret.consumer import ConfigError, JobContext, Worker
from leveret.producers import Publisher
from leveret.topology import declare
from tests.support import (
    CLASSIC_ONLY_PRIORITIES,
    Broker,
    assert_queue_types,
    running,
    unique,
    wait_for,
)


class Payload(BaseModel):
    n: int


async def _raw_publish(broker: Broker, routing_key: str, body: bytes, **props: object) -> None:
    """Publish like a client that has never seen Leveret's code."""
    connection = await aio_pika.connect(broker.url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange("jobs")
        await exchange.publish(
            aio_pika.Message(body, **props),  # type: ignore[arg-type]
            routing_key=routing_key,
            mandatory=True,
        )
    finally:
        await connection.close()


async def test_a_raw_amqp_client_job_is_handled_like_any_other(
    broker: Broker, registry, queue_type: str
) -> None:
    """A job published by plain aio-pika with the v1 wire format runs with its id."""
    worker = Worker(broker.settings(), registry=registry)
    queue = unique("raw")
    seen: list[tuple[int, str]] = []

    @worker.job(f"{queue}-job", queue=queue)
    async def handle(p: Payload, ctx: JobContext) -> None:
        seen.append((p.n, ctx.job_id))

    async with running(worker):
        await _raw_publish(
            broker,
            f"{queue}-job",
            b'{"n": 3}',
            content_type="application/json",
            type=f"{queue}-job",
            message_id="raw-id-1",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        # No type and no message_id: the routing key names the job, the worker assigns an id.
        assert broker.publish_via_api(f"{queue}-job", '{"n": 4}')
        await wait_for(lambda: len(seen) == 2, 10, "both raw jobs")
    assert seen[0] == (3, "raw-id-1")
    assert seen[1][0] == 4 and len(seen[1][1]) == 36


async def test_type_names_the_job_when_it_disagrees_with_the_routing_key(
    broker: Broker, registry
) -> None:
    """Where `type` and the routing key disagree, `type` wins."""
    worker = Worker(broker.settings(), registry=registry)
    queue = unique("raw")
    ran: list[str] = []

    @worker.job(f"{queue}-a", queue=queue)
    async def a(p: Payload) -> None:
        ran.append("a")

    @worker.job(f"{queue}-b", queue=queue)
    async def b(p: Payload) -> None:
        ran.append("b")

    async with running(worker):
        await _raw_publish(broker, f"{queue}-a", b'{"n": 1}', type=f"{queue}-b")
        await wait_for(lambda: ran, 10, "the job")
    assert ran == ["b"]


@CLASSIC_ONLY_PRIORITIES
async def test_higher_priority_jobs_run_first(broker: Broker, registry, queue_type: str) -> None:
    """Jobs queued while no worker runs come out highest priority first."""
    worker = Worker(broker.settings(prefetch=1), registry=registry)
    queue = unique("prio")
    order: list[int] = []

    @worker.job(f"{queue}-job", queue=queue)
    async def handle(p: Payload) -> None:
        order.append(p.n)

    connection = await aio_pika.connect(broker.url)
    await declare(connection, worker.topology)
    await connection.close()
    async with Publisher(broker.url) as pub:
        for priority in (1, 5, 0, 9, 3):
            await pub.publish(f"{queue}-job", {"n": priority}, priority=priority)
    async with running(worker):
        await wait_for(lambda: len(order) == 5, 10, "all five jobs")
    assert order == [9, 5, 3, 1, 0]


@pytest.mark.parametrize(
    ("body", "props", "reason", "error_part"),
    [
        (b"not json", {}, "invalid", "ValidationError"),
        (b"[1, 2]", {}, "invalid", "ValidationError"),
        (b'{"n": "x"}', {}, "invalid", "n: Input should be a valid integer"),
        (b"\xff\xfe", {}, "invalid", "ValidationError"),
        (b'{"n": 1}', {"content_type": "text/plain"}, "invalid", "content type"),
        (b'{"n": 1}', {"content_encoding": "gzip"}, "invalid", "content-encoding"),
        (b'{"n": 1}', {"headers": {"x-attempts": "two"}}, "invalid", "x-attempts"),
        (b'{"n": 1}', {"type": "no-such-job"}, "unknown_job", "no handler for job"),
    ],
)
async def test_bad_messages_are_dead_lettered_with_a_reason(
    broker: Broker,
    registry,
    body: bytes,
    props: dict,
    reason: str,
    error_part: str,
    queue_type: str,
) -> None:
    """Bad input lands in Q.dlq with x-reason, x-error and x-attempts 0; good jobs still run."""
    worker = Worker(broker.settings(), registry=registry)
    queue = unique("bad")
    good: list[int] = []

    @worker.job(f"{queue}-job", queue=queue)
    async def handle(p: Payload) -> None:
        good.append(p.n)

    async with running(worker):
        assert_queue_types(broker, queue, queue_type)
        await _raw_publish(broker, f"{queue}-job", body, message_id="bad-1", **props)
        await _raw_publish(broker, f"{queue}-job", b'{"n": 42}')
        await wait_for(lambda: broker.depth(f"{queue}.dlq"), 10, "the dead-lettered message")
        await wait_for(lambda: good, 10, "the good job after the bad one")
        assert worker.ready
    [dead] = broker.get_messages(f"{queue}.dlq")
    headers = dead["properties"]["headers"]
    assert headers["x-reason"] == reason
    assert error_part in headers["x-error"]
    assert headers["x-attempts"] == 0
    assert "\n" not in headers["x-error"]
    assert dead["properties"]["message_id"] == "bad-1"
    label = "unknown" if reason == "unknown_job" else f"{queue}-job"
    assert (
        registry.get_sample_value(
            "leveret_jobs_completed_total",
            {"queue": queue, "job_name": label, "outcome": "dead_lettered"},
        )
        == 1
    )


async def test_a_sync_handler_does_not_block_async_ones(broker: Broker, registry) -> None:
    """While a plain def handler blocks for a second, async jobs keep completing."""
    worker = Worker(broker.settings(prefetch=10), registry=registry)
    queue = unique("sync")
    blocking_started = threading.Event()
    fast_done: list[float] = []
    slow_done: list[float] = []

    @worker.job(f"{queue}-slow", queue=queue)
    def slow(p: Payload) -> None:
        blocking_started.set()
        time.sleep(1.0)
        slow_done.append(time.monotonic())

    @worker.job(f"{queue}-fast", queue=queue)
    async def fast(p: Payload) -> None:
        fast_done.append(time.monotonic())

    async with running(worker):
        async with Publisher(broker.url) as pub:
            await pub.publish(f"{queue}-slow", {"n": 0})
            await wait_for(blocking_started.is_set, 10, "the blocking handler to start")
            await pub.publish_many([(f"{queue}-fast", {"n": i}) for i in range(5)])
        await wait_for(lambda: len(fast_done) == 5 and slow_done, 10, "all jobs")
    assert max(fast_done) < slow_done[0]


async def test_prefetch_bounds_how_many_jobs_run_at_once(
    broker: Broker, registry, queue_type: str
) -> None:
    """With prefetch 3, never more than 3 handlers run concurrently, and 3 do."""
    worker = Worker(broker.settings(prefetch=3), registry=registry)
    queue = unique("pf")
    running_now = 0
    peak = 0
    done = 0

    @worker.job(f"{queue}-job", queue=queue)
    async def handle(p: Payload) -> None:
        nonlocal running_now, peak, done
        running_now += 1
        peak = max(peak, running_now)
        await asyncio.sleep(0.05)
        running_now -= 1
        done += 1

    async with running(worker):
        async with Publisher(broker.url) as pub:
            await pub.publish_many([(f"{queue}-job", {"n": i}) for i in range(30)])
        await wait_for(lambda: done == 30, 15, "all jobs")
    assert peak == 3


async def test_a_retry_waits_its_backoff_and_not_much_more(
    broker: Broker, registry, queue_type: str
) -> None:
    """A 1 s backoff reruns the job between 1.0 and 2.0 s after the failure."""
    worker = Worker(broker.settings(), registry=registry)
    queue = unique("timing")
    runs: list[float] = []

    @worker.job(f"{queue}-job", queue=queue, max_attempts=2, backoff=1.0)
    async def handle(p: Payload) -> None:
        runs.append(time.monotonic())
        if len(runs) == 1:
            raise RuntimeError("first run fails")

    async with running(worker):
        async with Publisher(broker.url) as pub:
            await pub.publish(f"{queue}-job", {"n": 1})
        await wait_for(lambda: len(runs) == 2, 10, "the retry")
    gap = runs[1] - runs[0]
    assert 1.0 <= gap < 2.0, gap
    assert (
        registry.get_sample_value(
            "leveret_jobs_completed_total",
            {"queue": queue, "job_name": f"{queue}-job", "outcome": "retried"},
        )
        == 1
    )


async def test_a_job_that_overruns_its_timeout_retries(
    broker: Broker, registry, queue_type: str
) -> None:
    """timeout= turns an overrun into a failure, which retries and then dead-letters."""
    worker = Worker(broker.settings(), registry=registry)
    queue = unique("to")

    @worker.job(f"{queue}-job", queue=queue, max_attempts=2, backoff=0.25, timeout=0.1)
    async def handle(p: Payload) -> None:
        await asyncio.sleep(10)

    async with running(worker):
        async with Publisher(broker.url) as pub:
            await pub.publish(f"{queue}-job", {"n": 1})
        await wait_for(lambda: broker.depth(f"{queue}.dlq"), 10, "the DLQ copy")
    [dead] = broker.get_messages(f"{queue}.dlq")
    assert dead["properties"]["headers"]["x-attempts"] == 2
    assert "timeout of 0.1 s" in dead["properties"]["headers"]["x-error"]


async def test_the_worker_reconnects_after_the_broker_closes_its_connection(
    broker: Broker, registry, queue_type: str
) -> None:
    """Closed from the broker side, the worker reconnects, consumes again and loses nothing."""
    worker = Worker(broker.settings(), registry=registry)
    queue = unique("recon")
    seen: set[int] = set()

    @worker.job(f"{queue}-job", queue=queue)
    async def handle(p: Payload) -> None:
        seen.add(p.n)

    async with running(worker):
        assert_queue_types(broker, queue, queue_type)
        async with Publisher(broker.url) as pub:
            await pub.publish_many([(f"{queue}-job", {"n": i}) for i in range(10)])
            await wait_for(lambda: len(seen) == 10, 10, "the first batch")
            await wait_for(broker.close_connections, 10, "connections to close")
            await wait_for(lambda: not worker.ready, 10, "the worker to notice")
            await wait_for(lambda: worker.ready, 20, "the worker to reconnect")
        async with Publisher(broker.url) as pub:
            await pub.publish_many([(f"{queue}-job", {"n": i}) for i in range(10, 20)])
        await wait_for(lambda: len(seen) == 20, 10, "the batch after the reconnect")
    assert seen == set(range(20))


async def test_log_lines_inside_a_job_carry_its_context(broker: Broker, registry) -> None:
    """ctx.log lines carry job_id, job, queue and attempt."""
    worker = Worker(broker.settings(), registry=registry)
    queue = unique("log")
    done = asyncio.Event()

    @worker.job(f"{queue}-job", queue=queue)
    async def handle(p: Payload, ctx: JobContext) -> None:
        ctx.log.info("inside", n=p.n)
        done.set()

    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with running(worker):
            async with Publisher(broker.url) as pub:
                job_id = await pub.publish(f"{queue}-job", {"n": 5})
            await asyncio.wait_for(done.wait(), 10)
    [line] = [entry for entry in logs if entry["event"] == "inside"]
    assert line["n"] == 5
    context = line.get("job_id"), line.get("job"), line.get("queue"), line.get("attempt")
    assert context == (job_id, f"{queue}-job", queue, 1)


async def test_graceful_stop_finishes_in_flight_jobs(
    broker: Broker, registry, queue_type: str
) -> None:
    """stop() lets a running job finish and ack before the worker returns."""
    worker = Worker(broker.settings(shutdown_grace=5), registry=registry)
    queue = unique("stop")
    started = asyncio.Event()
    finished: list[int] = []

    @worker.job(f"{queue}-job", queue=queue)
    async def handle(p: Payload) -> None:
        started.set()
        await asyncio.sleep(0.5)
        finished.append(p.n)

    task = asyncio.create_task(worker.run())
    await wait_for(lambda: worker.ready, 10, "worker ready")
    async with Publisher(broker.url) as pub:
        await pub.publish(f"{queue}-job", {"n": 1})
    await asyncio.wait_for(started.wait(), 10)
    worker.stop()
    await asyncio.wait_for(task, 10)
    assert finished == [1]
    assert await broker.depth(queue) == 0


async def test_a_job_longer_than_the_grace_goes_back_to_its_queue(
    broker: Broker, registry, queue_type: str
) -> None:
    """Past the grace the job is returned to Q (not the DLQ) without burning an attempt."""
    worker = Worker(broker.settings(shutdown_grace=0.3), registry=registry)
    queue = unique("stop")
    started = asyncio.Event()

    @worker.job(f"{queue}-job", queue=queue)
    async def handle(p: Payload) -> None:
        started.set()
        await asyncio.sleep(30)

    task = asyncio.create_task(worker.run())
    await wait_for(lambda: worker.ready, 10, "worker ready")
    async with Publisher(broker.url) as pub:
        await pub.publish(f"{queue}-job", {"n": 1})
    await asyncio.wait_for(started.wait(), 10)
    assert_queue_types(broker, queue, queue_type)
    began = time.monotonic()
    worker.stop()
    await asyncio.wait_for(task, 10)
    assert time.monotonic() - began < 0.3 + 2
    assert await broker.depth(queue) == 1
    assert await broker.depth(f"{queue}.dlq") == 0
    [msg] = broker.get_messages(queue)
    assert "x-attempts" not in (msg["properties"].get("headers") or {})


def test_bad_registrations_fail_at_import_time() -> None:
    """Registration errors surface when the decorator runs, never on a message."""
    worker = Worker()

    with pytest.raises(ConfigError, match="pydantic model"):

        @worker.job("untyped")
        async def untyped(payload) -> None:  # type: ignore[no-untyped-def]
            pass

    @worker.job("dup")
    async def dup(p: Payload) -> None:
        pass

    with pytest.raises(ConfigError, match="twice"):
        worker.job("dup")(dup)
    with pytest.raises(ConfigError, match="max_attempts"):
        worker.job("x", max_attempts=0)(dup)
    with pytest.raises(ConfigError, match="not valid"):
        worker.job("bad name")(dup)
    assert worker.job("plain")(dup) is dup


async def test_coalesced_acks_never_cover_a_job_still_running(broker: Broker, registry) -> None:
    """Jobs finishing after a long-running one are acked; the running one stays unacked."""
    worker = Worker(broker.settings(prefetch=50), registry=registry)
    queue = unique("ack")
    release = asyncio.Event()
    fast_done: list[int] = []

    @worker.job(f"{queue}-job", queue=queue)
    async def handle(p: Payload) -> None:
        if p.n == 0:
            await release.wait()
        else:
            fast_done.append(p.n)

    async with running(worker):
        async with Publisher(broker.url) as pub:
            await pub.publish(f"{queue}-job", {"n": 0})  # the lowest delivery tag
            await pub.publish_many([(f"{queue}-job", {"n": i}) for i in range(1, 41)])
        await wait_for(lambda: len(fast_done) == 40, 10, "the fast jobs")

        def unacked() -> int | None:
            return broker.queue(queue).get("messages_unacknowledged")

        # Management stats lag: wait until they show the 40 acks, then exactly one remains.
        await wait_for(lambda: unacked() == 1, 30, "every ack but the running job's")
        assert broker.queue(queue)["messages_ready"] == 0
        release.set()
        await wait_for(lambda: unacked() == 0, 30, "the last ack")
