"""``TestBroker`` runs groups in memory: members counted once each, the final job once with
``ctx.group``, counts from ``group_status``."""

from __future__ import annotations

from typing import Any

from leveret.consumer import JobContext, Reject, Worker
from leveret.producers import Job
from leveret.testing import TestBroker


async def test_group_in_memory_with_a_retry_and_a_dead_member() -> None:
    worker = Worker()
    seen: list[Any] = []

    @worker.job("double", queue="a", max_attempts=3, backoff=0)
    async def double(payload: dict[str, int], ctx: JobContext) -> int:
        if payload["n"] == 2 and ctx.attempt == 1:
            raise RuntimeError("once")
        return payload["n"] * 2

    @worker.job("refuse", queue="b")
    async def refuse(payload: dict[str, int]) -> None:
        raise Reject("no")

    @worker.job("report", queue="b")
    async def report(payload: dict[str, Any], ctx: JobContext) -> int:
        seen.append(ctx.group)
        return len(ctx.group.succeeded)

    async with TestBroker(worker) as broker:
        gid = await broker.group(
            [Job(job="double", payload={"n": 1}), ("double", {"n": 2}), ("refuse", {"n": 0})],
            then=Job(job="report", payload={"x": 1}),
        )
        assert broker.group_status(gid).counts["pending"] == 3
        await broker.join()
        status = broker.group_status(gid)

    assert len(seen) == 1
    group = seen[0]
    assert [(m.job, m.state, m.result) for m in group.members] == [
        ("double", "succeeded", 2),
        ("double", "succeeded", 4),
        ("refuse", "dead", None),
    ]
    assert group.results == {group.members[0].id: 2, group.members[1].id: 4}
    assert [s.result for s in broker.succeeded if s.job == "report"] == [2]
    assert len(broker.retries) == 1
    assert status.counts == {"succeeded": 2, "dead": 1, "cancelled": 0, "pending": 0}
    assert status.then_state == "succeeded"
