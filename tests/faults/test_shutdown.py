"""Scenario 5: SIGTERM lets in-flight jobs finish, and gives back (unburnt) those that cannot."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from leveret.producers import Publisher
from tests.faults.plumbing import install_app, reaped, record
from tests.support import Broker, assert_queue_types, unique, wait_for


async def test_sigterm_lets_in_flight_jobs_finish_and_exits_0(
    broker: Broker, tmp_path: Path, queue_type: str
):
    """Jobs running at SIGTERM finish within the grace, are acked, and the worker exits 0."""
    app = install_app(tmp_path, unique("term"), broker.url)
    await app.declare()
    assert_queue_types(broker, app.queue, queue_type)
    worker = app.worker(LEVERET_SHUTDOWN_GRACE="10")
    with reaped(worker):
        await worker.wait_ready()
        async with Publisher(broker.url) as pub:
            ids = await pub.publish_many([(app.job, {"sleep": 1.5}) for _ in range(5)])
        await wait_for(lambda: sum(r[0] == "start" for r in app.runs()) == 5, 15, "5 starts")
        t0 = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        code = await worker.wait_exit(15)
        took = time.monotonic() - t0
    assert code == 0, worker.log()
    assert sorted(r[2] for r in app.runs() if r[0] == "done") == sorted(ids)
    assert await broker.depth(app.queue) == 0
    assert await broker.depth(f"{app.queue}.dlq") == 0
    record("graceful shutdown, jobs finish", queue_type=queue_type, jobs=5, lost=0,
           duplicated=0, recovery_s=round(took, 2))  # fmt: skip


async def test_a_job_longer_than_the_grace_goes_back_unburnt(
    broker: Broker, tmp_path: Path, queue_type: str
):
    """A job outliving LEVERET_SHUTDOWN_GRACE returns to its queue, attempts not burnt."""
    app = install_app(tmp_path, unique("grace"), broker.url)
    await app.declare()
    assert_queue_types(broker, app.queue, queue_type)
    grace = 1.0
    async with Publisher(broker.url) as pub:
        job_id = await pub.publish(app.job, {"sleep": 60})
    returned = 0
    # Three shutdowns in a row must not count against the redelivery guard either.
    for _ in range(3):
        worker = app.worker(LEVERET_SHUTDOWN_GRACE=str(grace))
        with reaped(worker):
            await worker.wait_ready()
            await wait_for(lambda: any(r[0] == "start" for r in app.runs()), 15, "the start")
            t0 = time.monotonic()
            worker.proc.send_signal(signal.SIGTERM)
            code = await worker.wait_exit(grace + 10)
            took = time.monotonic() - t0
        assert code == 0, worker.log()
        assert took <= grace + 2, f"exit took {took:.2f} s with a grace of {grace} s"
        await wait_for(lambda: _depth(broker, app.queue, 1), 10, "the job back in its queue")
        assert await broker.depth(f"{app.queue}.dlq") == 0
        returned += 1
        (app.cwd / "marks" / job_id).unlink(missing_ok=True)  # keep it long for the next round
        app.log.unlink(missing_ok=True)
    # Had a shutdown counted as a redelivery, rounds 2 and 3 would have stamped x-redeliveries.
    # (Peeking requeues, which flags the message redelivered: so only once, at the end.)
    [back] = broker.get_messages(app.queue)
    headers = back["properties"].get("headers") or {}
    assert back["properties"]["message_id"] == job_id
    assert "x-attempts" not in headers, headers
    assert "x-redeliveries" not in headers, headers
    # Finally it runs, still as attempt 1.
    (app.cwd / "marks" / job_id).touch()
    worker = app.worker()
    with reaped(worker):
        await wait_for(lambda: any(r[0] == "done" for r in app.runs()), 20, "the final run")
        worker.proc.send_signal(signal.SIGTERM)
        assert await worker.wait_exit(10) == 0
    assert [(r[2], r[3]) for r in app.runs() if r[0] == "done"] == [(job_id, 1)]
    record("graceful shutdown, job longer than grace", queue_type=queue_type, jobs=1,
           lost=0, duplicated=0, returned=returned, recovery_s=round(took, 2))  # fmt: skip


async def _depth(broker: Broker, queue: str, n: int) -> bool:
    return await broker.depth(queue) == n
