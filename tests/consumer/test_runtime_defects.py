"""Worker runtime defects of issue 9, each against the real broker.

Every test here failed on the worker as it was before the fix: a delivery left unsettled, a
given-back job renamed, a cancelled consumer unnoticed, a refusing DLQ spun in a hot loop, a
cancelled ``run()`` leaking its session, global QoS refused by quorum queues, ``def`` jobs
timing out before they started.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from typing import Any

import aio_pika
import pytest
from pydantic import BaseModel, field_validator
from structlog.testing import capture_logs
from tenacity import RetryCallState
from tenacity.wait import wait_base

from leveret.consumer import JobContext, Worker
from leveret.producers import Publisher
from tests.support import Broker, running, unique, wait_for


class Payload(BaseModel):
    n: int


class Named(BaseModel):
    name: str

    @field_validator("name", mode="before")
    @classmethod
    def strip(cls, value: Any) -> Any:
        return value.strip()  # AttributeError on an int: pydantic does not wrap it


async def _consumers(broker: Broker, queue: str) -> int:
    connection = await aio_pika.connect(broker.url)
    try:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, passive=True)
        return q.declaration_result.consumer_count or 0
    finally:
        await connection.close()


# -- item 1 ------------------------------------------------------------------------------------


async def test_a_validator_raising_attribute_error_dead_letters_as_invalid(
    broker: Broker, registry
) -> None:
    worker = Worker(broker.settings(prefetch=2), registry=registry)
    queue = unique("val")
    good: list[str] = []

    @worker.job(f"{queue}-job", queue=queue)
    async def handle(p: Named) -> None:
        good.append(p.name)

    async with running(worker):
        async with Publisher(broker.url) as pub:
            await pub.publish(f"{queue}-job", {"name": 5})
            await pub.publish(f"{queue}-job", {"name": " ok "})
        await wait_for(lambda: broker.depth(f"{queue}.dlq"), 10, "the invalid message's DLQ copy")
        await wait_for(lambda: good, 10, "the good job")
        assert worker.ready
        assert await broker.depth(queue) == 0
    [dead] = broker.get_messages(f"{queue}.dlq")
    headers = dead["properties"]["headers"]
    assert headers["x-reason"] == "invalid"
    assert "AttributeError" in headers["x-error"]
    assert good == ["ok"]


class _NanWait(wait_base):
    def __call__(self, retry_state: RetryCallState) -> float:
        return math.nan


class _RaisingWait(wait_base):
    def __call__(self, retry_state: RetryCallState) -> float:
        raise KeyError("boom")


@pytest.mark.parametrize("backoff", [_NanWait(), _RaisingWait()], ids=["nan", "raises"])
async def test_a_broken_backoff_still_retries_the_job(
    broker: Broker, registry, backoff: wait_base
) -> None:
    """A wait strategy returning NaN or raising falls back to a sane delay: the job retries."""
    worker = Worker(broker.settings(), registry=registry)
    queue = unique("bk")
    runs: list[int] = []

    @worker.job(f"{queue}-job", queue=queue, max_attempts=2, backoff=backoff)
    async def handle(p: Payload, ctx: JobContext) -> None:
        runs.append(ctx.attempt)
        raise RuntimeError("fails")

    with capture_logs() as logs:
        async with running(worker):
            async with Publisher(broker.url) as pub:
                await pub.publish(f"{queue}-job", {"n": 1})
            await wait_for(lambda: broker.depth(f"{queue}.dlq"), 15, "the exhausted DLQ copy")
            assert worker.ready
    assert runs == [1, 2]
    [dead] = broker.get_messages(f"{queue}.dlq")
    assert dead["properties"]["headers"]["x-reason"] == "exhausted"
    assert any(e["event"] == "backoff_failed" for e in logs)


# -- item 2 ------------------------------------------------------------------------------------


async def test_a_job_given_back_at_shutdown_keeps_its_resolved_name_and_id(
    broker: Broker, registry
) -> None:
    """Sent without type or message_id, a job given back still names its job, with one id."""
    worker = Worker(broker.settings(shutdown_grace=0.2), registry=registry)
    queue = unique("gb")
    started = asyncio.Event()
    ids: list[str] = []

    @worker.job(f"{queue}-job", queue=queue)
    async def handle(p: Payload, ctx: JobContext) -> None:
        ids.append(ctx.job_id)
        started.set()
        await asyncio.sleep(30)

    task = asyncio.create_task(worker.run())
    await wait_for(lambda: worker.ready, 10, "worker ready")
    assert broker.publish_via_api(f"{queue}-job", '{"n": 1}')  # no type, no message_id
    await asyncio.wait_for(started.wait(), 10)
    worker.stop()
    await asyncio.wait_for(task, 10)
    [msg] = broker.get_messages(queue)
    assert msg["properties"]["type"] == f"{queue}-job"
    assert msg["properties"]["message_id"] == ids[0]


# -- item 3 ------------------------------------------------------------------------------------


async def test_a_deleted_work_queue_is_declared_and_consumed_again(
    broker: Broker, registry
) -> None:
    """basic.cancel from the broker (queue deleted) ends the session; the worker comes back."""
    worker = Worker(broker.settings(), registry=registry)
    queue = unique("del")
    seen: list[int] = []

    @worker.job(f"{queue}-job", queue=queue)
    async def handle(p: Payload) -> None:
        seen.append(p.n)

    with capture_logs() as logs:
        async with running(worker):
            assert broker.api("DELETE", f"/queues/{broker.qvhost}/{queue}").status_code == 204
            await wait_for(
                lambda: any(e["event"] == "consumer_cancelled_by_broker" for e in logs),
                10,
                "the cancel to be noticed",
            )
            await wait_for(lambda: broker.queue_exists(queue), 15, "the queue to be declared")
            await wait_for(lambda: worker.ready, 15, "the worker to be ready again")
            assert await _consumers(broker, queue) == 1
            async with Publisher(broker.url) as pub:
                await pub.publish(f"{queue}-job", {"n": 7})
            await wait_for(lambda: seen, 10, "a job on the recreated queue")
    assert seen == [7]


# -- item 4 ------------------------------------------------------------------------------------


async def test_a_refusing_dlq_is_not_a_hot_loop(broker: Broker, registry) -> None:
    """With Q.dlq refusing (max-length 0, reject-publish), an invalid message backs off."""
    worker = Worker(broker.settings(), registry=registry)
    queue = unique("refuse")
    policy = f"{queue}-refuse"
    response = broker.api(
        "PUT",
        f"/policies/{broker.qvhost}/{policy}",
        json={
            "pattern": f"^{queue}\\.dlq$",
            "definition": {"max-length": 0, "overflow": "reject-publish"},
            "apply-to": "queues",
            "priority": 10,
        },
    )
    assert response.status_code in (201, 204)

    @worker.job(f"{queue}-job", queue=queue)
    async def handle(p: Payload) -> None:
        pass

    try:
        with capture_logs() as logs:
            async with running(worker):
                async with Publisher(broker.url) as pub:
                    await pub.publish(f"{queue}-job", {"n": "not a number"})
                await wait_for(
                    lambda: any(e["event"] == "settle_failed" for e in logs), 10, "a settle failure"
                )
                await asyncio.sleep(2.5)
                failures = [e for e in logs if e["event"] == "settle_failed"]
                assert worker.ready
        # 0.5 + 1 + 2 s of backoff: a handful, where a hot loop makes thousands.
        assert 2 <= len(failures) <= 5, len(failures)
        assert [e["failures"] for e in failures] == list(range(1, len(failures) + 1))
        value = registry.get_sample_value("leveret_settle_failures_total", {"queue": queue})
        assert value is not None and value >= len(failures)
        assert await broker.depth(queue) == 1  # still there, nothing lost
    finally:
        broker.api("DELETE", f"/policies/{broker.qvhost}/{policy}")


# -- item 6 ------------------------------------------------------------------------------------


async def test_hung_def_jobs_do_not_time_out_the_jobs_queued_behind_them(
    broker: Broker, registry
) -> None:
    """Timeouts count from thread start; an exhausted pool means not ready, and says so."""
    worker = Worker(broker.settings(prefetch=2), registry=registry)
    queue = unique("hang")
    release = threading.Event()
    quick_ran: list[int] = []

    @worker.job(f"{queue}-hang", queue=queue, max_attempts=1, timeout=0.2)
    def hang(p: Payload) -> None:
        release.wait(30)

    @worker.job(f"{queue}-quick", queue=queue, max_attempts=1, timeout=0.5)
    def quick(p: Payload) -> None:
        time.sleep(0.05)
        quick_ran.append(p.n)

    try:
        with capture_logs() as logs:
            async with running(worker):
                async with Publisher(broker.url) as pub:
                    await pub.publish(f"{queue}-hang", {"n": 1})
                    await pub.publish(f"{queue}-hang", {"n": 2})
                    await wait_for(
                        lambda: not worker.ready, 10, "not ready once every thread is stuck"
                    )
                    assert any(e["event"] == "job_threads_exhausted" for e in logs)
                    await pub.publish(f"{queue}-quick", {"n": 3})
                # Longer than quick's timeout: it waits for a thread, it does not time out.
                await asyncio.sleep(1.0)
                assert quick_ran == []
                release.set()
                await wait_for(lambda: quick_ran, 10, "the quick job once a thread is free")
                await wait_for(lambda: worker.ready, 10, "ready again")
                stuck = [t for t in threading.enumerate() if t.name.startswith("leveret-job")]
                assert stuck and all(t.daemon for t in stuck)  # cannot keep the process alive
    finally:
        release.set()
    dead = broker.get_messages(f"{queue}.dlq")
    assert sorted(m["properties"]["type"] for m in dead) == [f"{queue}-hang"] * 2


# -- item 7 ------------------------------------------------------------------------------------


async def test_cancelling_run_shuts_down_like_stop(broker: Broker, registry) -> None:
    worker = Worker(broker.settings(), registry=registry)
    queue = unique("cancel")

    @worker.job(f"{queue}-job", queue=queue)
    def handle(p: Payload) -> None:
        pass

    task = asyncio.create_task(worker.run())
    await wait_for(lambda: worker.ready, 10, "worker ready")
    assert await _consumers(broker, queue) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)
    assert not worker.ready
    # The session is gone with it: no consumer left to take (and fail) jobs.
    assert await _consumers(broker, queue) == 0


# -- item 9 ------------------------------------------------------------------------------------


async def test_a_worker_consumes_several_quorum_queues(broker: Broker, registry) -> None:
    """No global QoS: quorum queues accept the consumers; each consumer may hold the whole
    prefetch (the pipeline keeps at most that many running: v3)."""
    worker = Worker(broker.settings(queue_type="quorum", prefetch=4), registry=registry)
    a, b = unique("qa"), unique("qb")
    seen: list[str] = []

    @worker.job(f"{a}-job", queue=a)
    async def on_a(p: Payload) -> None:
        seen.append("a")

    @worker.job(f"{b}-job", queue=b)
    async def on_b(p: Payload) -> None:
        seen.append("b")

    async with running(worker):
        assert broker.queue(a)["type"] == "quorum"
        async with Publisher(broker.url) as pub:
            await pub.publish(f"{a}-job", {"n": 1})
            await pub.publish(f"{b}-job", {"n": 2})
        await wait_for(lambda: len(seen) == 2, 10, "a job from each quorum queue")
    assert sorted(seen) == ["a", "b"]
    assert registry.get_sample_value("leveret_worker_prefetch", {"queue": a}) == 4


async def test_a_failing_log_sink_does_not_strand_a_delivery(broker: Broker, registry) -> None:
    """A log call raising on the way to an outcome (here: the id assignment) strands nothing."""
    worker = Worker(broker.settings(), registry=registry)
    queue = unique("logf")
    seen: list[int] = []

    @worker.job(f"{queue}-job", queue=queue)
    async def handle(p: Payload) -> None:
        seen.append(p.n)

    def explode(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        if event.get("event") == "job_id_assigned":
            raise RuntimeError("log sink down")
        return event

    with capture_logs(processors=[explode]):
        async with running(worker):
            assert broker.publish_via_api(f"{queue}-job", '{"n": 9}')  # no message_id
            await wait_for(lambda: seen, 10, "the job despite the failing log call")
            assert worker.ready
    assert seen == [9]
    assert await broker.depth(queue) == 0
