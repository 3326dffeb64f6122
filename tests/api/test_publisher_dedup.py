"""``Publisher.publish(..., dedup_key=)`` itself, on the real broker and Redis (database 13,
keys deleted afterwards): 20 concurrent publishes from 4 processes enqueue exactly one job; a
refused publish frees the key; no status store is a clear error; ``publish_many`` with
``Job(dedup_key=…)``."""

from __future__ import annotations

import multiprocessing
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor

import pytest
import redis.asyncio as aioredis

from leveret.producers import Publisher
from leveret.producers.dedup import HEADER_DEDUP_KEY, DedupUnavailableError
from leveret.producers.errors import UnroutableError
from leveret.producers.publisher import Job
from leveret.topology.declare import declare_url
from leveret.topology.model import Topology, WorkQueue
from tests.support import Broker

from . import dedup_pub_proc

STATUS_URL = dedup_pub_proc.STATUS_URL


@pytest.fixture
async def keys() -> AsyncIterator[list[str]]:
    """Dedup keys and job ids a test made: their claims, reverse entries and statuses go."""
    made: list[str] = []
    yield made
    client = aioredis.Redis.from_url(STATUS_URL)
    names = [n for m in made for n in (f"leveret:dedup:{m}", f"leveret:dedup-job:{m}",
                                       f"leveret:{m}")]  # fmt: skip
    if names:
        await client.delete(*names)
    await client.aclose()


async def _queue(broker: Broker) -> tuple[str, str]:
    queue = f"pdedup_{uuid.uuid4().hex[:6]}"
    job = f"{queue}_job"
    await declare_url(broker.url, Topology(queues=(WorkQueue(name=queue, jobs=(job,)),)))
    return queue, job


async def test_20_concurrent_publishes_from_4_processes_enqueue_exactly_one_job(
    broker: Broker, keys: list[str]
) -> None:
    queue, job = await _queue(broker)
    key = f"invoice-{uuid.uuid4().hex[:8]}"
    keys.append(key)
    start_at = time.time() + 3
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            pool.submit(dedup_pub_proc.publish, broker.url, job, key, 5, start_at) for _ in range(4)
        ]
        ids = [i for f in futures for i in f.result(timeout=120)]
    assert len(ids) == 20
    assert len(set(ids)) == 1, f"{len(set(ids))} different ids came back"
    keys.extend(set(ids))
    assert await broker.depth(queue) == 1
    (message,) = broker.get_messages(queue)
    assert message["properties"]["message_id"] == ids[0]
    assert message["properties"]["headers"][HEADER_DEDUP_KEY] == key


async def test_a_refused_publish_frees_the_key_and_a_bad_payload_never_claims_it(
    broker: Broker, keys: list[str]
) -> None:
    queue, job = await _queue(broker)
    key = f"order-{uuid.uuid4().hex[:8]}"
    keys.append(key)
    async with Publisher(broker.url, status_url=STATUS_URL) as pub:
        with pytest.raises(UnroutableError):
            await pub.publish("nobody_serves_this", {}, dedup_key=key)
        with pytest.raises(TypeError):
            await pub.publish(job, {"not json": object()}, dedup_key=key)
        client = aioredis.Redis.from_url(STATUS_URL)
        try:
            assert await client.get(f"leveret:dedup:{key}") is None  # free after both
        finally:
            await client.aclose()
        job_id = await pub.publish(job, {"n": 1}, dedup_key=key)
        keys.append(job_id)
        assert await pub.publish(job, {"n": 2}, dedup_key=key) == job_id
        status = await pub.status(job_id)
        assert status is not None and status.state == "queued"
    assert await broker.depth(queue) == 1


async def test_publish_many_deduplicates_its_keyed_jobs_and_keeps_the_order(
    broker: Broker, keys: list[str]
) -> None:
    queue, job = await _queue(broker)
    key = f"batch-{uuid.uuid4().hex[:8]}"
    keys.append(key)
    async with Publisher(broker.url, status_url=STATUS_URL) as pub:
        ids = await pub.publish_many(
            [
                (job, {"n": 0}),
                Job(job=job, payload={"n": 1}, dedup_key=key),
                (job, {"n": 2}),
                Job(job=job, payload={"n": 3}, dedup_key=key),
            ]
        )
    keys.extend(ids)
    assert len(ids) == 4
    assert ids[1] == ids[3] and len(set(ids)) == 3
    assert await broker.depth(queue) == 3


async def test_a_dedup_key_without_a_status_store_is_a_clear_error(broker: Broker) -> None:
    _, job = await _queue(broker)
    async with Publisher(broker.url, status_url=None) as pub:
        pub._status_store = None  # whatever LEVERET_STATUS_URL says in this environment
        with pytest.raises(DedupUnavailableError, match="LEVERET_STATUS_URL"):
            await pub.publish(job, {}, dedup_key="k")
