"""Issue 9 item 5: outcome copies under a memory alarm, on the dedicated node.

The broker blocks a connection once it publishes during an alarm and stops reading from it. If
retry/DLQ copies went out on the consuming connection, one failing job would freeze every ack
and hold every prefetch slot; and without a bound the confirm wait would never end.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import BaseModel
from structlog.testing import capture_logs

from leveret.consumer import JobContext, Worker
from leveret.producers import Publisher
from tests.faults.plumbing import DedicatedNode
from tests.faults.test_broker_node import _clear_alarm, _raise_alarm, settings
from tests.support import running, unique, wait_for


class Item(BaseModel):
    n: int = 0


@pytest.mark.slow
async def test_a_blocked_outcome_copy_times_out_and_acks_keep_flowing(
    node: DedicatedNode, registry
) -> None:
    queue = unique("blocked")
    # Events off: a succeeded job's outcome event is confirmed before its ack too, so with
    # events on nothing acks during an alarm; this is about the outcome copies' own connection.
    worker = Worker(
        settings(node, publish_timeout=1.0, prefetch=4, events="off"), registry=registry
    )
    gate = asyncio.Event()
    ok: list[str] = []

    @worker.job(f"{queue}-fail", queue=queue, max_attempts=3, backoff=0)
    async def fail(item: Item) -> None:
        await gate.wait()
        raise RuntimeError("needs a retry copy")

    @worker.job(f"{queue}-ok", queue=queue)
    async def succeed(item: Item, ctx: JobContext) -> None:
        await gate.wait()
        ok.append(ctx.job_id)

    with capture_logs() as logs:
        async with running(worker):
            async with Publisher(settings=settings(node)) as pub:
                await pub.publish(f"{queue}-fail", {"n": 0})
                queued = await pub.publish_many([(f"{queue}-ok", {"n": i}) for i in range(40)])
            await asyncio.to_thread(_raise_alarm, node)
            try:
                began = time.monotonic()
                gate.set()
                # The retry copy is never confirmed: a failed settle after publish_timeout...
                await wait_for(
                    lambda: any(e["event"] == "settle_failed" for e in logs), 10, "settle_failed"
                )
                took = time.monotonic() - began
                # ...while the acks, on their own connection, keep the jobs coming.
                await wait_for(lambda: set(ok) >= set(queued), 20, "the ok jobs during the alarm")
            finally:
                await asyncio.to_thread(_clear_alarm, node)
    [first] = [e for e in logs if e["event"] == "settle_failed"][:1]
    assert "not confirmed within 1 s" in first["error"]
    assert 0.9 <= took <= 4, took
