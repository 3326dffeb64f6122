"""The group layer's hold on a final job (``features.groups.ThenOnce``) against the real Redis,
with the worker around it stood in for: the hold outlives the run until the delivery's task
ends (settle writes the outcome's status in that task, before it ends), a second copy is
postponed while it is held and skipped once the first has ended, and a hold lost mid-run
cancels an async run."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from leveret.consumer import JobContext
from leveret.consumer.delivery.outcomes import AlreadyEnded, Postponed
from leveret.consumer.features.groups import GroupEnds, ThenOnce
from leveret.consumer.features.locks import DEFAULT_LOCK_PREFIX, LockLost, RedisLocks
from leveret.producers.groups import GroupStore, ThenJob, new_group_id, then_id
from leveret.producers.stores import JobStatus

from .conftest import STATUS_URL, Made


class Statuses:
    """The status store as the layer reads it: ``get`` only."""

    def __init__(self) -> None:
        self.by_id: dict[str, JobStatus] = {}

    async def get(self, job_id: str) -> JobStatus | None:
        return self.by_id.get(job_id)


def context(group_id: str, store: GroupStore, statuses: Statuses) -> JobContext:
    ctx = JobContext(then_id(group_id), "report", "q", 1, 3, None, payload={})  # type: ignore[arg-type]
    ctx.delivery = SimpleNamespace(properties=SimpleNamespace(headers={"x-group-then": group_id}))
    ctx.lifecycle = SimpleNamespace(  # type: ignore[assignment]
        groups=GroupEnds(store, {}), status=SimpleNamespace(store=statuses)
    )
    return ctx


async def new_group(store: GroupStore, made: Made) -> str:
    gid = new_group_id()
    made.groups.append(gid)
    then = ThenJob(job="report", job_id=then_id(gid), body="{}", exchange="x", routing_key="r")
    await store.create(gid, ["m1"], then)
    await store.end(gid, "m1", "succeeded", job="member", result=4)
    return gid


@pytest.fixture
async def client() -> Any:
    c = aioredis.Redis.from_url(STATUS_URL, decode_responses=True)
    yield c
    await c.aclose()


async def test_the_hold_lasts_until_the_delivery_ends_and_a_second_copy_waits_then_skips(
    client: Any, made: Made
) -> None:
    store, statuses, locks = GroupStore(client, ttl=600), Statuses(), RedisLocks(client)
    gid = await new_group(store, made)
    key = DEFAULT_LOCK_PREFIX + "key:" + then_id(gid)
    layer = ThenOnce(locks, 5.0, cancels=True)
    runs: list[Any] = []
    held_after_run: list[int] = []

    async def handler(c: JobContext) -> dict[str, int]:
        runs.append(c.group)
        return {"total": 4}

    async def second_copy() -> Any:
        return await layer(context(gid, store, statuses), handler)

    async def first_delivery() -> Any:
        result = await layer(context(gid, store, statuses), handler)
        # The run is over but its delivery is not: settle runs in this task, so a copy that
        # came now would read a status not yet ended. The hold must still stand.
        held_after_run.append(await client.exists(key))
        with pytest.raises(Postponed, match="held by another copy"):
            await asyncio.create_task(second_copy())
        statuses.by_id[then_id(gid)] = JobStatus(  # settle's status write
            id=then_id(gid),
            job="report",
            queue="q",
            state="succeeded",
            attempt=1,
            result=result,
            updated_at=datetime.now(UTC),
        )
        return result

    assert await asyncio.create_task(first_delivery()) == {"total": 4}
    assert held_after_run == [1]
    await asyncio.sleep(0.1)  # the release goes out with the next batch
    assert not await client.exists(key)
    # The second copy, back from its postponement, takes the hold and finds the job ended: it
    # is dropped as a duplicate (acked, no run, no event, the first outcome stands).
    with pytest.raises(AlreadyEnded, match="succeeded"):
        await asyncio.create_task(second_copy())
    assert len(runs) == 1 and runs[0].results == {"m1": 4}
    await asyncio.sleep(0.1)
    assert not await client.exists(key)


async def test_a_hold_lost_mid_run_cancels_the_async_run(client: Any, made: Made) -> None:
    store, statuses, locks = GroupStore(client, ttl=600), Statuses(), RedisLocks(client)
    gid = await new_group(store, made)
    key = DEFAULT_LOCK_PREFIX + "key:" + then_id(gid)
    layer = ThenOnce(locks, 0.6, cancels=True)
    ctx = context(gid, store, statuses)
    seen: list[str] = []
    sync = redis.Redis.from_url(STATUS_URL, decode_responses=True)

    async def handler(c: JobContext) -> None:
        seen.append("started")
        sync.delete(key)  # an operator, a flush, an expiry while Redis stalled
        await asyncio.sleep(5)
        seen.append("finished")  # never: cancelled at the next renewal

    async def delivery() -> None:
        with pytest.raises(LockLost):
            await layer(ctx, handler)
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0

    try:
        await asyncio.wait_for(asyncio.create_task(delivery()), 2.0)
    finally:
        sync.close()
    assert seen == ["started"] and ctx.lock_lost


async def test_a_job_that_is_no_final_job_makes_no_redis_call(made: Made) -> None:
    class NoStore:
        async def acquire(self, key: str, owner: str, ttl_s: float) -> int | None:
            raise AssertionError("a job without x-group-then took a hold")

        async def renew(self, key: str, owner: str, token: int, ttl_s: float) -> bool:
            raise AssertionError

        async def release(self, key: str, owner: str, token: int) -> None:
            raise AssertionError

    layer = ThenOnce(NoStore(), 5.0, cancels=True)
    ctx = JobContext("j1", "plain", "q", 1, 3, None, payload={})  # type: ignore[arg-type]
    ctx.delivery = SimpleNamespace(properties=SimpleNamespace(headers={"x-group-id": "group-x"}))
    ctx.lifecycle = SimpleNamespace(groups=object(), status=object())  # type: ignore[assignment]

    async def handler(c: JobContext) -> str:
        return "ran"

    assert await layer(ctx, handler) == "ran"
