"""``x-attempts`` of a job the redelivery guard dead-letters counts its runs: a job that crashed
its worker on every run has run once per crash, not 0 times (the contract: how many times a
handler ran it)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from leveret.producers import Publisher
from tests.faults.plumbing import install_app, reaped
from tests.support import Broker, assert_queue_types, unique


async def test_a_job_dead_lettered_by_the_guard_counts_its_crashed_runs(
    broker: Broker, tmp_path: Path, queue_type: str
) -> None:
    limit = 2
    app = install_app(tmp_path, unique("crashcount"), broker.url)
    await app.declare()
    assert_queue_types(broker, app.queue, queue_type)
    async with Publisher(broker.url) as pub:
        bomb = await pub.publish(app.job, {"crash": True})
    crashes = 0
    deadline = time.monotonic() + 120
    while not await broker.depth(f"{app.queue}.dlq"):
        assert crashes <= limit + 1 and time.monotonic() < deadline, "the guard did not stop it"
        worker = app.worker(LEVERET_MAX_REDELIVERIES=str(limit))
        with reaped(worker):
            while worker.proc.poll() is None:
                if await broker.depth(f"{app.queue}.dlq"):
                    break
                await asyncio.sleep(0.05)
            if worker.proc.poll() is not None:
                assert worker.proc.returncode == 17, worker.log()
                crashes += 1
    runs = [r for r in app.runs() if r[0] == "start" and r[2] == bomb]
    assert crashes == len(runs) == limit + 1
    (dead,) = broker.get_messages(f"{app.queue}.dlq")
    headers = dead["properties"]["headers"]
    assert headers["x-reason"] == "exhausted"
    assert headers["x-attempts"] == len(runs), headers
