"""Job status end to end: the worker writes each job's status to Redis before its ack; readers.

On the real broker and Redis. The shared Redis is used through database 13, and every key a
test created is deleted afterwards; tests that stop Redis use a private ``redis-server``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry

from leveret.consumer import JobContext, Worker
from leveret.producers import Publisher
from leveret.producers.settings import ConnectionSettings
from leveret.producers.stores.status import DEFAULT_PREFIX, JobFailed, JobStatus
from tests.faults.plumbing import WorkerProcess, reaped
from tests.support import Broker, assert_queue_types, leveret_cli, running, unique, wait_for

from .conftest import PrivateRedis, _free_port

STATUS_URL = "redis://127.0.0.1:6379/13"


@pytest.fixture
def job_ids() -> Any:
    """Collects the ids a test created; their status keys are deleted afterwards."""
    ids: list[str] = []
    yield ids
    client = redis.Redis.from_url(STATUS_URL)
    if ids:
        client.delete(*(DEFAULT_PREFIX + i for i in ids))
    client.close()


def publisher(broker: Broker, exchange: str, status_url: str = STATUS_URL) -> Publisher:
    return Publisher(
        settings=ConnectionSettings(amqp_url=broker.url, exchange=exchange),
        status_url=status_url,
    )


async def state(pub: Publisher, job_id: str) -> str | None:
    status = await pub.status(job_id)
    return None if status is None else status.state


async def test_status_through_every_reader_within_one_second(
    broker: Broker, registry: CollectorRegistry, job_ids: list[str], queue_type: str
) -> None:
    exchange, queue = unique("ex"), unique("q")
    worker = Worker(broker.settings(exchange=exchange, status_url=STATUS_URL), registry=registry)
    assert worker.settings.events_mode == "off"  # v3: the status store needs no events
    release = asyncio.Event()
    returned: dict[str, float] = {}

    @worker.job(f"{queue}-job", queue=queue, max_attempts=1)
    async def job(payload: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        await ctx.progress(0.25, "a quarter")
        await release.wait()
        returned[ctx.job_id] = time.monotonic()
        if payload.get("fail"):
            raise RuntimeError("it broke")
        return {"echo": payload["n"]}

    async with running(worker), publisher(broker, exchange) as pub:
        assert_queue_types(broker, queue, queue_type)
        # Publish before any worker consumes? The worker runs: the status is queued at once.
        job_id = await pub.publish(f"{queue}-job", {"n": 7})
        job_ids.append(job_id)
        first = await pub.status(job_id)
        assert first is not None and first.state in ("queued", "started")
        # Running, with its progress.
        seen = await wait_for(
            lambda: _progress_of(pub, job_id), 1.0, "started with progress in the status"
        )
        assert seen == (0.25, "a quarter")
        release.set()
        result = await pub.result(job_id, timeout=5)
        assert result == {"echo": 7}
        assert time.monotonic() - returned[job_id] < 1.0
        final = await pub.status(job_id)
        assert final is not None
        assert (final.state, final.attempt, final.queue, final.job) == (
            "succeeded",
            1,
            queue,
            f"{queue}-job",
        )

        failing = await pub.publish(f"{queue}-job", {"n": 1, "fail": True})
        job_ids.append(failing)
        with pytest.raises(JobFailed, match="it broke"):
            await pub.result(failing, timeout=5)
        assert time.monotonic() - returned[failing] < 1.0
        with pytest.raises(TimeoutError):
            await pub.result(unique("nobody"), timeout=0.3)

    shown = leveret_cli("job", "show", job_id, env={"LEVERET_STATUS_URL": STATUS_URL})
    assert shown.returncode == 0, shown.stderr
    body = json.loads(shown.stdout)
    assert body["id"] == job_id and body["state"] == "succeeded"
    assert body["result"] == {"echo": 7}
    assert set(body) == set(JobStatus.model_fields)
    unknown = leveret_cli("job", "show", "no-such-id", env={"LEVERET_STATUS_URL": STATUS_URL})
    assert unknown.returncode != 0 and "no status for job no-such-id" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1


async def test_a_follow_up_job_reads_queued_once_its_parent_succeeded(
    broker: Broker, registry: CollectorRegistry, job_ids: list[str]
) -> None:
    """``ctx.enqueue`` is publishing through the library: the child reads ``queued`` at once,
    as a job published with ``Publisher`` does, even while no worker consumes its queue."""
    exchange, queue, idle = unique("ex"), unique("q"), unique("idle")
    worker = Worker(broker.settings(exchange=exchange, status_url=STATUS_URL), registry=registry)
    children: list[str] = []

    @worker.job(f"{queue}-parent", queue=queue)
    async def parent(payload: dict[str, Any], ctx: JobContext) -> None:
        children.append(await ctx.enqueue(f"{idle}-child", {"from": ctx.job_id}))

    @worker.job(f"{idle}-child", queue=idle)  # declared, never consumed here
    async def child(payload: dict[str, Any]) -> None:
        raise AssertionError("the child's queue is not consumed in this test")

    async with running(worker, queues=[queue]), publisher(broker, exchange) as pub:
        parent_id = await pub.publish(f"{queue}-parent", {})
        job_ids.append(parent_id)
        assert await pub.result(parent_id, timeout=5) is None
        assert len(children) == 1
        job_ids.extend(children)
        child_status = await wait_for(
            lambda: pub.status(children[0]), 1.0, "the follow-up's queued status"
        )
        assert (child_status.state, child_status.job) == ("queued", f"{idle}-child")
        assert await broker.depth(idle) == 1  # queued for real, not only in Redis


async def _progress_of(pub: Publisher, job_id: str) -> tuple[float | None, str | None] | None:
    status = await pub.status(job_id)
    if status is None or status.state != "started" or status.progress is None:
        return None
    return status.progress, status.message


async def test_redis_down_jobs_run_acks_wait_not_ready_then_every_job_recorded_once(
    broker: Broker, registry: CollectorRegistry, private_redis: PrivateRedis
) -> None:
    """Contract v3: while Redis cannot be reached, jobs still run but their acks wait;
    ``/readyz`` turns 503 after ``LEVERET_STATUS_TIMEOUT``; once Redis answers every status is
    written and the acks go out: each job ran once and reads ``succeeded``."""
    exchange, queue = unique("ex"), unique("q")
    port = _free_port()
    settings = broker.settings(
        exchange=exchange, status_url=private_redis.url, status_timeout=1.0, metrics_port=port
    )
    worker = Worker(settings, registry=registry)
    ran: list[str] = []

    @worker.job(f"{queue}-job", queue=queue)
    async def job(payload: dict[str, Any], ctx: JobContext) -> int:
        ran.append(ctx.job_id)
        return int(payload["n"])

    async with running(worker):
        await wait_for(lambda: worker.ready, 10, "the worker to be ready")
        async with publisher(broker, exchange, private_redis.url) as pub:
            private_redis.stop()
            # The publish stands though the queued write fails (logged).
            ids = [await pub.publish(f"{queue}-job", {"n": n}) for n in range(5)]
            await wait_for(lambda: set(ids) <= set(ran), 10, "every job to run without Redis")
            await wait_for(lambda: not worker.ready, 5, "not ready after the status timeout")
            async with httpx.AsyncClient() as http:
                readyz = await http.get(f"http://127.0.0.1:{port}/readyz")
            assert readyz.status_code == 503
            await wait_for(  # the broker's figures refresh every few seconds
                lambda: broker.queue(queue).get("messages_unacknowledged", 0) == 5,
                15,
                "the five acks to be held",
            )
            private_redis.start()

            async def all_succeeded() -> bool:
                try:
                    states = [await pub.status(i) for i in ids]
                except Exception:
                    return False
                return all(s is not None and s.state == "succeeded" for s in states)

            await wait_for(all_succeeded, 30, "statuses written once Redis is back")
            assert [await pub.result(i, timeout=1) for i in ids] == list(range(5))
            await wait_for(lambda: worker.ready, 10, "ready again")
            await wait_for(
                lambda: broker.queue(queue).get("messages_unacknowledged", 0) == 0,
                15,
                "the acks to go out",
            )
    assert sorted(ran) == sorted(ids)  # each ran once: nothing was given back or redelivered


# -- a worker process killed mid-job, and between success and ack ---------------------------


def _install(tmp_path: Path, broker: Broker, **env: str) -> tuple[Path, dict[str, str]]:
    app = tmp_path / "app"
    app.mkdir()
    (app / "marks").mkdir()
    shutil.copy(Path(__file__).with_name("app_template.py"), app / "lcapp.py")
    return app, {
        "LC_QUEUE": env.pop("queue"),
        "LC_MARKS": str(app / "marks"),
        "LC_LOG": str(app / "runs.log"),
        "LEVERET_EXCHANGE": env.pop("exchange"),
        "LEVERET_STATUS_URL": STATUS_URL,
        "PYTHONPATH": f"{app}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        **env,
    }


async def test_a_worker_killed_mid_job_leaves_a_status_that_ends_correct(
    broker: Broker, tmp_path: Path, job_ids: list[str]
) -> None:
    exchange, queue = unique("ex"), unique("q")
    app, env = _install(tmp_path, broker, queue=queue, exchange=exchange)
    first = WorkerProcess.start(app, "lcapp:worker", broker.url, env=env)
    with reaped(first):
        await first.wait_ready()
        async with publisher(broker, exchange) as pub:
            job_id = await pub.publish(f"{queue}-slow", {"sleep": 60})
            job_ids.append(job_id)
            await wait_for(lambda: state(pub, job_id), 5, "a status")
            await wait_for(lambda: _is(pub, job_id, "started"), 5, "the status to read started")
            first.kill()  # SIGKILL, mid-job
            second = WorkerProcess.start(app, "lcapp:worker", broker.url, env=env)
            with reaped(second):
                await second.wait_ready()
                result = await pub.result(job_id, timeout=30)
            status = await pub.status(job_id)
    assert result == {"attempt": 1}  # a redelivery after a crash is the same attempt
    assert status is not None and status.state == "succeeded" and status.attempt == 1


async def _is(pub: Publisher, job_id: str, wanted: str) -> bool:
    return await state(pub, job_id) == wanted


async def test_chaining_across_a_crash_between_success_and_ack_never_loses(
    broker: Broker, tmp_path: Path, job_ids: list[str]
) -> None:
    exchange, queue = unique("ex"), unique("q")
    app, env = _install(tmp_path, broker, queue=queue, exchange=exchange, LC_CRASH_BEFORE_ACK="1")
    log = app / "runs.log"

    def lines(kind: str) -> list[list[str]]:
        text = log.read_text() if log.exists() else ""
        return [line.split() for line in text.splitlines() if line.startswith(kind)]

    first = WorkerProcess.start(app, "lcapp:worker", broker.url, env=env)
    with reaped(first):
        await first.wait_ready()
        async with publisher(broker, exchange) as pub:
            parent = await pub.publish(f"{queue}-parent", {})
            job_ids.append(parent)
            assert await first.wait_exit(20) == 9  # died between the confirms and the ack
            enqueued_first = [line[3] for line in lines("enqueue")]
            assert len(enqueued_first) == 1
            second = WorkerProcess.start(app, "lcapp:worker", broker.url, env=env)
            with reaped(second):
                await second.wait_ready()
                await wait_for(lambda: len(lines("enqueue")) == 2, 20, "the parent's rerun")
                children = [line[3] for line in lines("enqueue")]
                job_ids.extend(children)
                await wait_for(
                    lambda: {line[2] for line in lines("run child")} >= set(children),
                    20,
                    "both children to run",
                )
                assert await pub.result(parent, timeout=10) is None
    ran = [line[2] for line in lines("run child")]
    # Duplicated (the parent ran twice, each run enqueued its child), never lost: the child
    # the first run published before the crash ran too.
    assert enqueued_first[0] in ran and set(children) <= set(ran)
    assert all(line[3] == parent for line in lines("run child"))
