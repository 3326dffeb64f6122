"""Job groups on the real broker and Redis: members on several queues, a retried member, two
members ending at the same instant on two workers, counts, and the errors."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from leveret.consumer import JobContext, Reject, Worker
from leveret.producers import Job, Publisher
from leveret.producers.groups import GroupStore, GroupsUnavailableError, ThenJob, then_id
from leveret.producers.settings import ConnectionSettings
from tests.support import Broker, running, unique, wait_for

from .conftest import STATUS_URL, Made


def publisher(broker: Broker, exchange: str, status_url: str | None = STATUS_URL) -> Publisher:
    return Publisher(
        settings=ConnectionSettings(amqp_url=broker.url, exchange=exchange), status_url=status_url
    )


async def test_members_on_two_queues_one_retried_then_runs_once_with_every_outcome(
    broker: Broker, made: Made
) -> None:
    exchange, qa, qb = unique("ex"), unique("qa"), unique("qb")
    worker = Worker(
        broker.settings(exchange=exchange, status_url=STATUS_URL), registry=CollectorRegistry()
    )
    finals: list[Any] = []
    flaky_runs: list[int] = []

    @worker.job(f"{qa}-square", queue=qa, max_attempts=3, backoff=0)
    async def square(payload: dict[str, int]) -> int:
        return payload["n"] ** 2

    @worker.job(f"{qa}-flaky", queue=qa, max_attempts=3, backoff=0)
    async def flaky(payload: dict[str, int], ctx: JobContext) -> str:
        flaky_runs.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("first run fails")
        return "second time lucky"

    @worker.job(f"{qb}-refuse", queue=qb, max_attempts=3)
    async def refuse(payload: dict[str, int]) -> None:
        raise Reject("not this one")

    @worker.job(f"{qb}-report", queue=qb)
    async def report(payload: dict[str, str], ctx: JobContext) -> dict[str, int]:
        finals.append((payload, ctx.group, ctx.job_id))
        return {"members": len(ctx.group.members)}

    async with running(worker), publisher(broker, exchange) as pub:
        members = [
            Job(job=f"{qa}-square", payload={"n": 3}),
            Job(job=f"{qa}-square", payload={"n": 4}),
            Job(job=f"{qa}-flaky", payload={"n": 0}),
            Job(job=f"{qb}-refuse", payload={"n": 0}),
        ]
        gid = await pub.group(members, then=Job(job=f"{qb}-report", payload={"title": "t"}))
        made.groups.append(gid)
        assert gid.startswith("group-")
        result = await pub.result(then_id(gid), timeout=30)
        assert result == {"members": 4}
        await asyncio.sleep(0.5)  # a second run would show up by now
        status = await pub.status(gid)
        # A duplicate of the final job (what a crash between its confirm and ``then_sent``
        # would publish): acked as a duplicate, not run again.
        await pub.publish(
            f"{qb}-report", {"title": "t"}, job_id=then_id(gid), headers={"x-group-then": gid}
        )
        await asyncio.sleep(1.0)
    assert len(finals) == 1
    payload, group, final_id = finals[0]
    assert payload == {"title": "t"} and final_id == then_id(gid)
    assert group.id == gid
    states = [(m.job, m.state, m.result) for m in group.members]
    assert states == [
        (f"{qa}-square", "succeeded", 9),
        (f"{qa}-square", "succeeded", 16),
        (f"{qa}-flaky", "succeeded", "second time lucky"),
        (f"{qb}-refuse", "dead", None),
    ]
    assert "not this one" in (group.members[3].error or "")
    assert flaky_runs == [1, 2]
    assert group.counts == {"succeeded": 3, "dead": 1, "cancelled": 0}
    assert status is not None
    assert status.total == 4 and status.ended == 4 and status.done
    assert status.counts == {"succeeded": 3, "dead": 1, "cancelled": 0, "pending": 0}
    assert status.then_state == "succeeded"


async def test_two_members_ending_at_the_same_instant_on_two_workers(
    broker: Broker, made: Made
) -> None:
    exchange, queue = unique("ex"), unique("q")
    release = asyncio.Event()
    started: list[str] = []
    finals: list[Any] = []

    def make_worker() -> Worker:
        w = Worker(
            broker.settings(exchange=exchange, status_url=STATUS_URL, prefetch=1),
            registry=CollectorRegistry(),
        )

        @w.job(f"{queue}-member", queue=queue)
        async def member(payload: dict[str, int], ctx: JobContext) -> int:
            started.append(ctx.job_id)
            await release.wait()  # both end together
            return payload["n"]

        @w.job(f"{queue}-final", queue=queue)
        async def final(payload: dict[str, int], ctx: JobContext) -> None:
            finals.append(ctx.group)

        return w

    one, two = make_worker(), make_worker()
    async with running(one), running(two), publisher(broker, exchange) as pub:
        gid = await pub.group(
            [(f"{queue}-member", {"n": 1}), (f"{queue}-member", {"n": 2})],
            then=Job(job=f"{queue}-final", payload={}),
        )
        made.groups.append(gid)
        await wait_for(lambda: len(started) == 2, 15, "both members running, one per worker")
        mid = await pub.status(gid)
        assert mid is not None and mid.counts["pending"] == 2
        release.set()
        await pub.result(then_id(gid), timeout=20)
        await asyncio.sleep(0.5)
        status = await pub.status(gid)
    assert len(finals) == 1
    assert sorted(m.result for m in finals[0].members) == [1, 2]
    assert status is not None and status.counts["succeeded"] == 2 and status.ended == 2


async def test_concurrent_endings_count_once_each_and_one_completer(made: Made) -> None:
    """The script alone, raced from 8 clients: 200 members, each ended 3 times."""
    import redis.asyncio as aioredis

    clients = [aioredis.Redis.from_url(STATUS_URL, decode_responses=True) for _ in range(8)]
    stores = [GroupStore(c, ttl=600) for c in clients]
    gid = unique("group")
    made.groups.append(gid)
    members = [f"{gid}-m{i}" for i in range(200)]
    then = ThenJob(job="final", job_id=then_id(gid), body="{}", exchange="x", routing_key="final")
    await stores[0].create(gid, members, then)
    calls = [
        stores[(i + k) % 8].end(gid, m, "succeeded" if i % 5 else "dead", result=i)
        for k in range(3)
        for i, m in enumerate(members)
    ]
    outcomes = await asyncio.gather(*calls)
    publishers = [t for code, t in outcomes if code == 1]
    status = await stores[0].status(gid)
    for c in clients:
        await c.aclose()
    # Every settle of the completer says "publish" until then_sent: the first ending of each
    # member counted, the completer being one member (3 calls for it, all say publish).
    assert len(publishers) in (1, 2, 3) and all(t == then for t in publishers)
    assert status is not None
    assert status.ended == 200
    assert status.counts == {"succeeded": 160, "dead": 40, "cancelled": 0, "pending": 0}


async def test_group_without_redis_is_a_clear_error(broker: Broker) -> None:
    async with publisher(broker, unique("ex"), status_url=None) as pub:
        with pytest.raises(GroupsUnavailableError, match="LEVERET_STATUS_URL"):
            await pub.group([("a", {})], then=Job(job="b", payload={}))


async def test_group_refuses_an_empty_group_and_a_final_job_id(broker: Broker) -> None:
    async with publisher(broker, unique("ex")) as pub:
        with pytest.raises(ValueError, match="at least one"):
            await pub.group([], then=Job(job="b", payload={}))
        with pytest.raises(ValueError, match="then"):
            await pub.group([("a", {})], then=Job(job="b", payload={}, job_id="mine"))


async def test_a_group_id_in_use_is_refused_not_reset(broker: Broker) -> None:
    """Publishing a group under an id already recorded would reset its members' counts."""
    from leveret.producers.errors import DuplicateJobIdError
    from leveret.producers.groups import GroupStore, ThenJob
    from leveret.producers.stores import RedisStatusStore

    store = GroupStore.of(RedisStatusStore.from_url(STATUS_URL))
    assert store is not None
    gid = f"group-{unique('dup')}"
    then = ThenJob(
        job="report", job_id=f"{gid}.then", body="{}", exchange="x", routing_key="report"
    )
    try:
        await store.create(gid, ["a", "b"], then)
        await store.end(gid, "a", "succeeded")
        with pytest.raises(DuplicateJobIdError):
            await store.create(gid, ["a", "b"], then)
        status = await store.status(gid)
        assert status is not None and status.ended == 1
    finally:
        await store.client.delete(*store._keys(gid))
        await store.client.aclose()
