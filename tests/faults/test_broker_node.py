"""Scenarios 3, 4 and 7 on a dedicated RabbitMQ node: restart, memory alarm, consumer_timeout.

The shared broker is never touched: ``node`` is a second RabbitMQ started for this session.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from leveret.consumer import JobContext, Worker, WorkerSettings
from leveret.producers import Publisher
from leveret.producers.errors import PublishError, PublishTimeout
from tests.faults.plumbing import DedicatedNode, record
from tests.support import leveret_cli, running, unique, wait_for


class Item(BaseModel):
    n: int = 0


def settings(node: DedicatedNode, **overrides: object) -> WorkerSettings:
    values: dict[str, object] = {"amqp_url": node.url, "metrics_port": 0, "shutdown_grace": 5}
    values.update(overrides)
    return WorkerSettings(**values)  # type: ignore[arg-type]


@pytest.mark.slow
async def test_broker_restart_loses_no_confirmed_job(
    node: DedicatedNode, registry, queue_type: str
) -> None:
    """stop_app/start_app while publishing and consuming: every confirmed job runs, on classic
    queues and on quorum queues (a one-member Raft group here, recovered from its log)."""
    queue = unique("restart")
    worker = Worker(settings(node), registry=registry)
    ran: collections.Counter[str] = collections.Counter()

    @worker.job(f"{queue}-job", queue=queue)
    async def handle(item: Item, ctx: JobContext) -> None:
        ran[ctx.job_id] += 1
        await asyncio.sleep(0.005)

    timeout = 3.0
    confirmed: list[str] = []
    failures: list[tuple[str, float]] = []
    stop = asyncio.Event()

    async def publish_forever(pub: Publisher) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            t0 = time.monotonic()
            try:
                confirmed.append(await pub.publish(f"{queue}-job", {"n": n}))
            except PublishError as exc:  # PublishTimeout included
                failures.append((type(exc).__name__, time.monotonic() - t0))
                await asyncio.sleep(0.1)
            else:
                await asyncio.sleep(0.002)

    async with running(worker):
        async with Publisher(settings=settings(node, publish_timeout=timeout)) as pub:
            publisher = asyncio.create_task(publish_forever(pub))
            await wait_for(lambda: len(ran) >= 200, 20, "jobs flowing before the restart")
            queue_info = node.ctl("list_queues", "name", "type", "--no-table-headers")
            assert f"{queue}\t{queue_type}" in queue_info, queue_info
            await asyncio.to_thread(node.ctl, "stop_app")
            down_at = time.monotonic()
            await wait_for(lambda: not worker.ready, 10, "the worker to notice")
            await asyncio.sleep(2)
            await asyncio.to_thread(node.ctl, "start_app")
            await asyncio.to_thread(node.wait_app, True)
            up_at = time.monotonic()
            before = len(confirmed)
            await wait_for(lambda: worker.ready, 60, "the worker to reconnect")
            worker_back = time.monotonic() - up_at
            await wait_for(lambda: len(confirmed) > before + 50, 60, "publishing to recover")
            publisher_back = time.monotonic() - up_at
            stop.set()
            await publisher
        await wait_for(lambda: set(ran) >= set(confirmed), 60, "every confirmed job to run")
    lost = set(confirmed) - set(ran)
    duplicated = [i for i, n in ran.items() if n > 1]
    assert not lost
    assert failures, "some publish must have met the outage"
    # A publish during the outage fails within its timeout (plus scheduling slack); it never
    # returned an id for a job the broker did not confirm (all confirmed ids ran, above).
    assert max(took for _, took in failures) <= timeout + 1.5, failures
    record(
        "broker restart (stop_app/start_app)",
        queue_type=queue_type,
        jobs=len(confirmed),
        lost=len(lost),
        duplicated=len(duplicated),
        failed_publishes=len(failures),
        outage_s=round(up_at - down_at, 2),
        recovery_s=round(worker_back, 2),
        publisher_recovery_s=round(publisher_back, 2),
    )


def _raise_alarm(node: DedicatedNode) -> None:
    """Set the memory watermark absurdly low on the dedicated node and wait for the alarm."""
    node.ctl("set_vm_memory_high_watermark", "0.00001")
    deadline = time.monotonic() + 20
    while "memory" not in node.ctl("eval", "rabbit_alarm:get_alarms()."):
        assert time.monotonic() < deadline, "the memory alarm did not go off"
        time.sleep(0.2)


@pytest.mark.slow
async def test_memory_alarm_times_publishes_out_and_workers_drain(
    node: DedicatedNode, registry, tmp_path: Path
) -> None:
    """Under a memory alarm publish raises PublishTimeout in time; workers keep draining.

    With outcome events off: an outcome event is confirmed before the ack (the contract), so
    with events on a blocked broker holds every completion until the alarm clears (each settle
    times out after LEVERET_PUBLISH_TIMEOUT and the job is given back after a backoff).
    """
    queue = unique("alarm")
    worker = Worker(settings(node, events="off"), registry=registry)
    gate = asyncio.Event()
    ran: list[str] = []

    @worker.job(f"{queue}-job", queue=queue)
    async def handle(item: Item, ctx: JobContext) -> None:
        await gate.wait()  # nothing finishes before the alarm is on
        ran.append(ctx.job_id)

    timeout = 2.0
    async with running(worker):
        async with Publisher(settings=settings(node)) as pub:
            queued = await pub.publish_many([(f"{queue}-job", {"n": i}) for i in range(300)])
        blocked_pub = Publisher(settings=settings(node, publish_timeout=timeout))
        await blocked_pub.connect()
        try:
            await asyncio.to_thread(_raise_alarm, node)
            try:
                gate.set()
                t0 = time.monotonic()
                with pytest.raises(PublishTimeout) as caught:
                    await blocked_pub.publish(f"{queue}-job", {"n": -1})
                took = time.monotonic() - t0
                assert timeout - 0.1 <= took <= timeout + 1.5
                assert "memory/disk alarm" in str(caught.value)
                # The CLI gives up the same way: one line, non-zero exit.
                t1 = time.monotonic()
                cli = await asyncio.to_thread(
                    leveret_cli,
                    "publish",
                    f"{queue}-job",
                    '{"n": -2}',
                    cwd=tmp_path,
                    env={"LEVERET_AMQP_URL": node.url, "LEVERET_PUBLISH_TIMEOUT": str(timeout)},
                )
                cli_took = time.monotonic() - t1
                assert cli.returncode != 0
                assert "not confirmed" in cli.stderr and "Traceback" not in cli.stderr
                assert len(cli.stderr.strip().splitlines()) == 1, cli.stderr
                # Consumers are not blocked: the backlog drains during the alarm.
                await wait_for(lambda: set(ran) >= set(queued), 30, "the backlog to drain")
                drained_during_alarm = len(set(ran) & set(queued))
            finally:
                await asyncio.to_thread(_clear_alarm, node)
            cleared = time.monotonic()
            # After the alarm the same publisher works again.
            job_id = await _publish_eventually(blocked_pub, f"{queue}-job", 20)
            recovery = time.monotonic() - cleared
            await wait_for(lambda: job_id in ran, 20, "the post-alarm job to run")
        finally:
            await blocked_pub.close()
    record(
        "memory alarm",
        jobs=len(queued),
        lost=len(set(queued) - set(ran)),
        duplicated=0,
        drained_during_alarm=drained_during_alarm,
        publish_gave_up_s=round(took, 2),
        cli_gave_up_s=round(cli_took, 2),
        recovery_s=round(recovery, 2),
    )


def _clear_alarm(node: DedicatedNode) -> None:
    node.ctl("set_vm_memory_high_watermark", "0.4")
    deadline = time.monotonic() + 20
    while "memory" in node.ctl("eval", "rabbit_alarm:get_alarms().", check=False):
        assert time.monotonic() < deadline, "the memory alarm did not clear"
        time.sleep(0.2)


async def _publish_eventually(pub: Publisher, job: str, within: float) -> str:
    deadline = time.monotonic() + within
    while True:
        try:
            return await pub.publish(job, {"n": 1})
        except PublishError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@contextlib.contextmanager
def consumer_timeout(node: DedicatedNode, ms: int):  # type: ignore[no-untyped-def]
    before = node.ctl("eval", "application:get_env(rabbit, consumer_timeout).").strip()
    node.ctl("eval", f"application:set_env(rabbit, consumer_timeout, {ms}).")
    try:
        yield
    finally:
        if before.startswith("{ok,"):
            node.ctl("eval", f"application:set_env(rabbit, consumer_timeout, {before[4:-1]}).")
        else:
            node.ctl("eval", "application:unset_env(rabbit, consumer_timeout).")


@pytest.mark.slow
async def test_a_job_outliving_consumer_timeout_is_not_lost(node: DedicatedNode, registry) -> None:
    """A job longer than the broker's consumer_timeout costs a reconnect, not the job."""
    queue = unique("ctimeout")
    worker = Worker(settings(node, max_redeliveries=2), registry=registry)
    ran: list[tuple[str, str]] = []
    long_once: set[str] = set()

    @worker.job(f"{queue}-once", queue=queue)
    async def once(item: Item, ctx: JobContext) -> None:
        ran.append(("once-start", ctx.job_id))
        if ctx.job_id not in long_once:
            long_once.add(ctx.job_id)
            await asyncio.sleep(6)
        ran.append(("once-done", ctx.job_id))

    @worker.job(f"{queue}-always", queue=queue)
    async def always(item: Item, ctx: JobContext) -> None:
        ran.append(("always-start", ctx.job_id))
        await asyncio.sleep(6)

    @worker.job(f"{queue}-short", queue=queue)
    async def short(item: Item, ctx: JobContext) -> None:
        ran.append(("short", ctx.job_id))

    t0 = time.monotonic()
    with consumer_timeout(node, 2000):
        async with running(worker):
            async with Publisher(settings=settings(node)) as pub:
                once_id = await pub.publish(f"{queue}-once", {})
                await wait_for(lambda: ("once-done", once_id) in ran, 40, "the long job to finish")
                always_id = await pub.publish(f"{queue}-always", {})
                shorts = []
                for i in range(20):
                    shorts.append(await pub.publish(f"{queue}-short", {"n": i}))
                    await asyncio.sleep(0.5)
            await wait_for(lambda: _dlq_has(node, queue), 60, "the always-long job in the DLQ")
            await wait_for(lambda: {i for k, i in ran if k == "short"} >= set(shorts), 30, "shorts")
            assert worker.ready
    took = time.monotonic() - t0
    dead = await _dlq(node, queue)
    assert [m.message_id for m in dead] == [always_id]
    assert dead[0].headers["x-reason"] == "exhausted"
    always_runs = sum(1 for k, i in ran if i == always_id)
    assert always_runs <= 3  # max_redeliveries + 1
    record(
        "consumer_timeout 2 s vs 6 s jobs",
        jobs=22,
        lost=0,
        duplicated=sum(1 for k, i in ran if k == "once-start") - 1,
        always_long_runs=always_runs,
        recovery_s=round(took, 1),
    )


async def _dlq(node: DedicatedNode, queue: str) -> list:  # type: ignore[type-arg]
    import aio_pika

    connection = await aio_pika.connect(node.url)
    out = []
    async with connection:
        channel = await connection.channel()
        q = await channel.declare_queue(f"{queue}.dlq", passive=True)
        while (message := await q.get(no_ack=False, fail=False)) is not None:
            out.append(message)  # left unacked: closing the channel puts it back
    return out


async def _dlq_has(node: DedicatedNode, queue: str) -> bool:
    import aio_pika

    connection = await aio_pika.connect(node.url)
    async with connection:
        channel = await connection.channel()
        q = await channel.declare_queue(f"{queue}.dlq", passive=True)
        return bool(q.declaration_result.message_count)
