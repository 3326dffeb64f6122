"""A group's final job runs once even when two copies of it are in flight at the same moment
(the republish a worker dying between the final job's confirm and its member's ack makes), on
the real broker and Redis: the copy that finds the first run's hold waits (postponed, no
attempt burnt) and, once it gets the hold, finds the first run ended and is not run. A first
run SIGKILLed mid-run lets the final job complete once its hold lapses (``LEVERET_LOCK_TTL``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import aiormq
import httpx
import pytest
import redis
from pamqp.commands import Basic
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from leveret.consumer import JobContext, Worker
from leveret.consumer.features.groups import then_copy
from leveret.producers import Job, Publisher
from leveret.producers.groups import DEFAULT_GROUP_PREFIX, ThenJob, then_id
from leveret.producers.settings import ConnectionSettings
from tests.faults.plumbing import WorkerProcess, reaped
from tests.support import Broker, running, unique, wait_for

from .conftest import STATUS_URL, Made


def publisher(broker: Broker, exchange: str) -> Publisher:
    return Publisher(
        settings=ConnectionSettings(amqp_url=broker.url, exchange=exchange), status_url=STATUS_URL
    )


async def publish_then_again(broker: Broker, group_id: str) -> None:
    """The final job published a second time, byte for byte as the completer's settle publishes
    it (``then_copy`` of the final job the group recorded): what a redelivered completer sends
    when its worker died after the first copy's confirm and before ``then_sent``."""
    client = redis.Redis.from_url(STATUS_URL, decode_responses=True)
    try:
        raw = client.hget(DEFAULT_GROUP_PREFIX + group_id, "then")
    finally:
        client.close()
    assert isinstance(raw, str), f"group {group_id} not recorded"
    copy = then_copy(ThenJob.model_validate_json(raw))
    connection = await aiormq.connect(broker.url)
    try:
        channel = await connection.channel()
        await channel.confirm_delivery()
        confirm = await channel.basic_publish(
            copy.body,
            exchange=copy.exchange,
            routing_key=copy.routing_key,
            properties=copy.properties,
            mandatory=True,
        )
        assert isinstance(confirm, Basic.Ack), confirm
    finally:
        await connection.close()


def waiting(broker: Broker, exchange: str, queue: str) -> int:
    """Messages still held by the broker (ready or unacked) in ``queue`` and the delay chain
    (a postponed copy waits there): 0 once every copy of the final job is settled. The
    management API's figures lag a few seconds, so callers poll."""
    listed = broker.api("GET", f"/queues/{broker.qvhost}?columns=name,messages").json()
    return sum(
        int(q.get("messages") or 0)
        for q in listed
        if q["name"] == queue or q["name"].startswith(f"{exchange}.delay.")
    )


def completed(registries: list[CollectorRegistry], queue: str, job: str) -> float:
    """Settled ``succeeded`` outcomes of ``job`` over the workers: runs only (a second copy
    dropped as a duplicate is no run: ``outcomes.AlreadyEnded``)."""
    labels = {"queue": queue, "job_name": job, "outcome": "succeeded"}
    return sum(r.get_sample_value("leveret_jobs_completed_total", labels) or 0 for r in registries)


@pytest.mark.parametrize("layout", ["one worker, prefetch 4", "two workers, prefetch 1"])
async def test_two_copies_of_the_final_job_in_flight_at_once_run_it_once(
    broker: Broker, made: Made, layout: str
) -> None:
    exchange, queue = unique("ex"), unique("q")
    two = layout.startswith("two")
    release = asyncio.Event()
    runs: list[tuple[str, int, list[Any]]] = []
    registries: list[CollectorRegistry] = []

    def make_worker() -> Worker:
        registries.append(CollectorRegistry())
        w = Worker(
            broker.settings(exchange=exchange, status_url=STATUS_URL, prefetch=1 if two else 4),
            registry=registries[-1],
        )

        @w.job(f"{queue}-member", queue=queue)
        async def member(payload: dict[str, int]) -> int:
            return payload["n"]

        @w.job(f"{queue}-final", queue=queue, max_attempts=3)
        async def final(payload: dict[str, str], ctx: JobContext) -> dict[str, int]:
            runs.append((ctx.job_id, ctx.attempt, [m.result for m in ctx.group.members]))
            await release.wait()  # the first run is still going when the second copy arrives
            return {"sum": sum(m.result for m in ctx.group.members)}

        return w

    workers = [make_worker() for _ in range(2 if two else 1)]
    async with (
        running(workers[0]),
        running(workers[-1]) if two else contextlib.nullcontext(),
        publisher(broker, exchange) as pub,
    ):
        gid = await pub.group(
            [(f"{queue}-member", {"n": 1}), (f"{queue}-member", {"n": 2})],
            then=Job(job=f"{queue}-final", payload={"title": "t"}),
        )
        made.groups.append(gid)
        await wait_for(lambda: len(runs) == 1, 20, "the final job's first run")
        await publish_then_again(broker, gid)
        # The second copy is delivered at once (a free prefetch slot, or the idle worker):
        # without the hold it would run now, beside the first run.
        await asyncio.sleep(1.5)
        assert len(runs) == 1, runs
        assert completed(registries, queue, f"{queue}-final") == 0  # nothing settled yet
        release.set()
        result = await pub.result(then_id(gid), timeout=20)
        # Both copies settled: the run, and the second copy acked without running (a
        # duplicate is no run: not counted, no event, the first run's status stands).
        await asyncio.sleep(1.0)  # the second copy is back from the delay chain by now
        await wait_for(
            lambda: waiting(broker, exchange, queue) == 0,
            30,
            "the second copy of the final job settled",
        )
        assert completed(registries, queue, f"{queue}-final") == 1
        await asyncio.sleep(0.5)  # a late run would show by now
        status = await pub.status(gid)
        then_status = await pub.status(then_id(gid))  # the final job, not the group
    assert runs == [(then_id(gid), 1, [1, 2])]
    assert result == {"sum": 3}
    assert status is not None and status.ended == 2
    assert status.counts == {"succeeded": 2, "dead": 0, "cancelled": 0, "pending": 0}
    assert status.then_state == "succeeded"
    assert then_status is not None and then_status.state == "succeeded"
    assert then_status.attempt == 1  # the second copy burnt no attempt and wrote no run


APP = """
import asyncio, os
from leveret.consumer import JobContext, Worker

worker = Worker()
QUEUE = os.environ["GROUP_QUEUE"]
MARK = os.environ["GROUP_MARK"]
_LOG = os.open(os.environ["GROUP_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def note(line: str) -> None:
    os.write(_LOG, (line + "\\n").encode())


@worker.job(QUEUE + "-member", queue=QUEUE)
async def member(payload: dict) -> int:
    return payload["n"]


@worker.job(QUEUE + "-final", queue=QUEUE + "-final")
async def final(payload: dict, ctx: JobContext) -> int:
    note(f"start {os.getpid()} {ctx.attempt}")
    if not os.path.exists(MARK):  # the first run: long enough to be SIGKILLed in the middle
        open(MARK, "w").close()
        await asyncio.sleep(120)
    total = sum(m.result for m in ctx.group.members)
    note(f"done {os.getpid()} {total}")
    return total
"""


def metric(worker: WorkerProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def test_a_final_run_sigkilled_mid_run_lets_the_final_job_complete_once(
    broker: Broker, tmp_path: Path, made: Made
) -> None:
    exchange, queue = unique("ex"), unique("q")
    (tmp_path / "thenapp.py").write_text(APP)
    log = tmp_path / "runs.log"
    env = {
        "GROUP_QUEUE": queue,
        "GROUP_LOG": str(log),
        "GROUP_MARK": str(tmp_path / "first-run"),
        "LEVERET_EXCHANGE": exchange,
        "LEVERET_STATUS_URL": STATUS_URL,
        "LEVERET_PREFETCH": "4",
        "LEVERET_LOCK_TTL": "2",
    }
    procs = [WorkerProcess.start(tmp_path, "thenapp:worker", broker.url, env=env) for _ in "ab"]
    settings = ConnectionSettings(amqp_url=broker.url, exchange=exchange)

    def lines(kind: str) -> list[list[str]]:
        text = log.read_text() if log.exists() else ""
        return [line.split()[1:] for line in text.splitlines() if line.startswith(kind + " ")]

    with reaped(*procs):
        for p in procs:
            await p.wait_ready()
        async with Publisher(settings=settings, status_url=STATUS_URL) as pub:
            gid = await pub.group(
                [Job(job=f"{queue}-member", payload={"n": n}) for n in (5, 7)],
                then=Job(job=f"{queue}-final", payload={}),
            )
            made.groups.append(gid)
            await wait_for(lambda: lines("start"), 30, "the final job's first run")
            # A second copy in flight too (a republish), held off by the first run's hold.
            await publish_then_again(broker, gid)
            await asyncio.sleep(1.0)
            assert len(lines("start")) == 1 and not lines("done"), log.read_text()
            first = int(lines("start")[0][0])
            victim = next(p for p in procs if p.proc.pid == first)
            survivor = next(p for p in procs if p is not victim)
            killed_at = time.monotonic()
            victim.kill()  # SIGKILL mid-run: its hold is never released, it lapses in 2 s
            result = await pub.result(then_id(gid), timeout=60)
            took = time.monotonic() - killed_at
            final = f"{queue}-final"
            # The redelivered first copy and the republished one both settle on the survivor:
            # one ran, the other was acked without running (not counted as a run).
            settled = {"job_name": final, "outcome": "succeeded"}
            await asyncio.sleep(1.0)
            await wait_for(
                lambda: waiting(broker, exchange, queue) == 0,
                30,
                "both copies of the final job settled",
            )
            assert metric(survivor, "leveret_jobs_completed_total", **settled) == 1
            await asyncio.sleep(0.5)
            status = await pub.status(gid)
            then_status = await pub.status(then_id(gid))  # the final job, not the group
            survivor_runs = metric(survivor, "leveret_jobs_started_total", job_name=final)
    starts, dones = lines("start"), lines("done")
    assert len(starts) == 2 and len(dones) == 1, log.read_text()
    assert dones[0] == [str(survivor.proc.pid), "12"]
    assert result == 12
    assert survivor_runs == 1  # the skipped copy and the postponed ones were no runs
    assert status is not None and status.then_state == "succeeded"
    assert status.counts == {"succeeded": 2, "dead": 0, "cancelled": 0, "pending": 0}
    assert then_status is not None and then_status.state == "succeeded"
    print(f"\nTHEN-SIGKILL final job completed {took:.1f} s after its first run was killed")
