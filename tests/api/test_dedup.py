"""De-duplication on the real Redis and broker: one claim wins however many processes race, a
failed publish frees the key, an ending frees it, and the API answers a held key with the first
job's id."""

from __future__ import annotations

import multiprocessing
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry

from leveret.producers.errors import UnroutableError
from leveret.producers.publisher import Publisher
from leveret.producers.stores.dedup import (
    HEADER_DEDUP_KEY,
    DedupStore,
    InvalidDedupKeyError,
    publish_once,
)
from leveret.producers.wire.events import JobEvent
from leveret.topology import Topology, WorkQueue, declare_url
from tests.support import Broker

from . import dedup_proc
from .conftest import SHARED_REDIS, RedisParts, build, purge, serve, wait_connected

EMAIL = {"to": "a@b.c", "subject": "hi"}


@pytest.fixture
async def dedup(redis_parts: RedisParts):  # type: ignore[no-untyped-def]
    store = DedupStore.from_url(SHARED_REDIS, ttl=600, prefix=redis_parts.prefix)
    yield store
    await store.close()


async def test_claim_is_exclusive_and_release_is_compare_and_delete(dedup: DedupStore) -> None:
    assert await dedup.claim("k", "job-1") is None
    assert await dedup.claim("k", "job-2") == "job-1"
    assert await dedup.holder("k") == "job-1"
    # Pending: a short TTL until the publish is confirmed, then the full one.
    assert 0 < await dedup.client.ttl(dedup.claim_key("k")) <= dedup.pending_ttl
    assert await dedup.confirm("k", "job-1")
    assert await dedup.client.ttl(dedup.claim_key("k")) > dedup.pending_ttl
    # A stale release (another id) never frees a key it does not hold.
    assert not await dedup.release("k", "job-2")
    assert await dedup.holder("k") == "job-1"
    # What the status keeper calls on an ending event: by job id alone.
    assert await dedup.release_job("job-1")
    assert await dedup.holder("k") is None
    assert not await dedup.release_job("job-1")  # twice: nothing left, nothing wrong
    assert not await dedup.release_job("never-had-a-key")
    # Free again: the next claim wins.
    assert await dedup.claim("k", "job-3") is None
    assert await dedup.release("k", "job-3")
    assert not await dedup.confirm("k", "job-3")  # released: nothing to extend


async def test_release_job_spares_a_key_taken_over_by_a_newer_job(dedup: DedupStore) -> None:
    """The first claim expired (its publisher died) and a newer job holds the key: the old
    job's ending must not free it."""
    assert await dedup.claim("k", "old") is None
    await dedup.client.delete(dedup.claim_key("k"))  # as if its pending TTL ran out
    assert await dedup.claim("k", "new") is None
    await dedup.confirm("k", "new")
    assert not await dedup.release_job("old")
    assert await dedup.holder("k") == "new"


async def test_bad_keys_are_refused(dedup: DedupStore) -> None:
    for key in ("", "x" * 513):
        with pytest.raises(InvalidDedupKeyError):
            await dedup.claim(key, "j")


async def test_a_refused_publish_frees_the_key(broker: Broker, dedup: DedupStore) -> None:
    await declare_url(broker.url, Topology(queues=(WorkQueue(name="dedup_other", jobs=("x",)),)))
    async with Publisher(broker.url) as pub:

        async def send(job_id: str, headers: dict[str, str]) -> None:
            await pub.publish("nobody_serves_this", {}, job_id=job_id, headers=headers)

        with pytest.raises(UnroutableError):
            await publish_once(dedup, "invoice-1", "first", send)
        assert await dedup.holder("invoice-1") is None
        assert await dedup.client.get(dedup.job_key("first")) is None


async def test_20_concurrent_publishes_from_4_processes_enqueue_exactly_one_job(
    broker: Broker, redis_parts: RedisParts
) -> None:
    queue = f"dedup_{uuid.uuid4().hex[:6]}"
    job = f"{queue}_job"
    await declare_url(broker.url, Topology(queues=(WorkQueue(name=queue, jobs=(job,)),)))
    key = "invoice-42"
    start_at = time.time() + 3  # every process connected, then all go at once
    with ProcessPoolExecutor(4, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            pool.submit(
                dedup_proc.publish_many_once, broker.url, redis_parts.prefix, job, key, 5, start_at
            )
            for _ in range(4)
        ]
        results = [r for f in futures for r in f.result(timeout=120)]
    assert len(results) == 20
    ids = {job_id for job_id, _ in results}
    assert len(ids) == 1, f"{len(ids)} different ids came back"
    assert sum(published for _, published in results) == 1
    assert await broker.depth(queue) == 1
    (message,) = broker.get_messages(queue)
    assert message["properties"]["message_id"] in ids
    assert message["properties"]["headers"][HEADER_DEDUP_KEY] == key


async def test_the_api_answers_a_held_key_with_the_first_id_and_frees_it_on_a_failure(
    broker: Broker, redis_parts: RedisParts
) -> None:
    app = build(broker, redis_parts, CollectorRegistry())
    keys = DedupStore.from_url(SHARED_REDIS, ttl=600, prefix=redis_parts.prefix)
    store = redis_parts.test_store()
    try:
        with serve(app) as served:
            wait_connected(served)
            purge(broker, "api_email")
            with served.client() as client:
                first = client.post("/jobs/send_email", json=EMAIL, params={"dedup_key": "o-7"})
                again = client.post("/jobs/send_email", json=EMAIL, params={"dedup_key": "o-7"})
                assert first.status_code == again.status_code == 202
                assert first.json() == again.json()
                assert await broker.depth("api_email") == 1
                job_id = first.json()["id"]
                # The job ends; the keeper releases by job id; the key is free again.
                await store.apply(JobEvent(job_id=job_id, job="send_email", queue="api_email",
                                           state="succeeded", attempt=1,
                                           at=datetime.now(UTC)))  # fmt: skip
                assert await keys.release_job(job_id)
                third = client.post("/jobs/send_email", json=EMAIL, params={"dedup_key": "o-7"})
                assert third.status_code == 202
                assert third.json()["id"] != job_id
                assert await broker.depth("api_email") == 2
                # A refused publish (the queue is gone: unroutable) answers 503, frees the key.
                broker.api("DELETE", f"/queues/{broker.qvhost}/api_images").raise_for_status()
                refused = client.post("/jobs/resize", json={"width": 1, "height": 1},
                                      params={"dedup_key": "img-1"})  # fmt: skip
                assert refused.status_code == 503
                assert "unroutable" in refused.json()["detail"]
                assert await keys.holder("img-1") is None
    finally:
        await keys.close()
        await store.close()


async def test_dedup_key_without_a_status_store_is_a_clear_501(broker: Broker) -> None:
    app = build(broker, None, CollectorRegistry())
    with serve(app) as served:
        wait_connected(served)
        with served.client() as client:
            response = client.post("/jobs/send_email", json=EMAIL, params={"dedup_key": "x"})
            assert response.status_code == 501
            assert "LEVERET_STATUS_URL" in response.json()["detail"]
