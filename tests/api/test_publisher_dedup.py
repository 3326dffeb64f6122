"""``Publisher.publish(..., dedup_key=)`` itself, on the real broker and Redis (database 13,
keys deleted afterwards): 20 concurrent publishes from 4 processes enqueue exactly one job; a
refused publish frees the key; no status store is a clear error; ``publish_many`` with
``Job(dedup_key=…)``."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from typing import cast

import aio_pika
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs
from yarl import URL

from leveret.producers import Publisher
from leveret.producers.broker.batch import BatchPublishError
from leveret.producers.errors import ConnectionLost, PublishTimeout, RefusedError, UnroutableError
from leveret.producers.publisher import Job
from leveret.producers.settings import ConnectionSettings
from leveret.producers.stores.dedup import HEADER_DEDUP_KEY, DedupStore, DedupUnavailableError
from leveret.topology.declare import declare_url
from leveret.topology.model import Topology, WorkQueue
from tests.faults.plumbing import TcpProxy
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


# -- publish_many: every job confirmed or named -------------------------------------------------


def _ids(*names: str) -> dict[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return {n: f"{n}-{suffix}" for n in names}


async def test_publish_many_a_refused_plain_job_still_publishes_and_names_the_dedup_jobs(
    broker: Broker, keys: list[str]
) -> None:
    """A batch mixing plain and keyed jobs where one of each is unroutable: the error names
    exactly those two, ``landed`` every other id (the keyed good one included, published even
    though the plain part failed), and the queue holds exactly ``landed``."""
    queue, job = await _queue(broker)
    good_key, bad_key = f"g-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    ids = _ids("plain-ok", "plain-bad", "keyed-ok", "keyed-bad", "plain-ok2")
    keys.extend([good_key, bad_key, *ids.values()])
    nobody = f"nobody_{uuid.uuid4().hex[:6]}"
    async with Publisher(broker.url, status_url=STATUS_URL) as pub:
        with pytest.raises(BatchPublishError) as info:
            await pub.publish_many(
                [
                    Job(job=job, payload={}, job_id=ids["plain-ok"]),
                    Job(job=nobody, payload={}, job_id=ids["plain-bad"]),
                    Job(job=job, payload={}, job_id=ids["keyed-ok"], dedup_key=good_key),
                    Job(job=nobody, payload={}, job_id=ids["keyed-bad"], dedup_key=bad_key),
                    Job(job=job, payload={}, job_id=ids["plain-ok2"]),
                ]
            )
        err = info.value
        assert list(err.errors) == [ids["plain-bad"], ids["keyed-bad"]]
        assert all(isinstance(e, UnroutableError) for e in err.errors.values())
        assert err.landed == [ids["plain-ok"], ids["keyed-ok"], ids["plain-ok2"]]
        dedup = pub._dedup_store()
        assert await dedup.holder(good_key) == ids["keyed-ok"]
        assert await dedup.holder(bad_key) is None  # refused: free at once
    got = [m["properties"]["message_id"] for m in broker.get_messages(queue)]
    assert sorted(got) == sorted(err.landed)


async def test_publish_many_a_refused_dedup_job_is_named_with_the_ids_that_landed(
    broker: Broker, keys: list[str]
) -> None:
    """Only a keyed job fails (unroutable): ``BatchPublishError`` (not its bare error) names it
    and carries every other id as landed, so a retry need not resend them."""
    queue, job = await _queue(broker)
    key = f"k-{uuid.uuid4().hex[:8]}"
    ids = _ids("a", "b")
    keys.extend([key, *ids.values()])
    nobody = f"nobody_{uuid.uuid4().hex[:6]}"
    async with Publisher(broker.url, status_url=STATUS_URL) as pub:
        with pytest.raises(BatchPublishError) as info:
            await pub.publish_many(
                [
                    Job(job=job, payload={}, job_id=ids["a"]),
                    Job(job=nobody, payload={}, job_id=ids["b"], dedup_key=key),
                    (job, {"n": 2}),
                ]
            )
    err = info.value
    assert list(err.errors) == [ids["b"]]
    assert isinstance(err.errors[ids["b"]], UnroutableError)
    assert len(err.landed) == 2 and err.landed[0] == ids["a"]
    keys.extend(err.landed)
    got = [m["properties"]["message_id"] for m in broker.get_messages(queue)]
    assert sorted(got) == sorted(err.landed)


# -- the claim after a failed publish: free on a refusal, held on an unknown outcome -------------


class _Held:
    """A reader whose data is held back while its proxy is stalled."""

    def __init__(self, reader: asyncio.StreamReader, proxy: _StallingProxy) -> None:
        self.reader = reader
        self.proxy = proxy

    async def read(self, n: int) -> bytes:
        data = await self.reader.read(n)
        await self.proxy.flowing.wait()
        return data


class _StallingProxy(TcpProxy):
    """While stalled, nothing the broker sends reaches the client: a publish arrives and is
    queued, its confirm does not come back (an unknown outcome, for real)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.flowing = asyncio.Event()
        self.flowing.set()

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        if dst is pair[0]:  # broker -> client
            src = cast(asyncio.StreamReader, _Held(src, self))
        await super()._pipe(src, dst, pair)


async def test_an_unknown_outcome_keeps_the_key_held_until_the_pending_ttl(
    broker: Broker, keys: list[str]
) -> None:
    """A publish whose confirm never comes (PublishTimeout) and one whose connection is cut
    after sending (ConnectionLost): the broker has each job, and the key stays held by it, so
    a retry returns that id and enqueues nothing; the claim then expires after the pending TTL
    (3 s here, 60 s by default) and the key is free."""
    queue, job = await _queue(broker)
    timed_key, cut_key = f"t-{uuid.uuid4().hex[:8]}", f"c-{uuid.uuid4().hex[:8]}"
    ids = _ids("timed", "cut")
    keys.extend([timed_key, cut_key, *ids.values()])
    proxy = await _StallingProxy("127.0.0.1", broker.amqp_port).start()
    try:
        via_proxy = str(URL(broker.url).with_port(proxy.port))
        settings = ConnectionSettings(amqp_url=via_proxy, publish_timeout=1.0)
        async with Publisher(settings=settings, status_url=STATUS_URL) as pub:
            real = pub._dedup_store()
            dedup = pub._dedup = DedupStore(real.client, ttl=real.ttl, pending_ttl=3)
            proxy.flowing.clear()
            with pytest.raises(PublishTimeout):
                await pub.publish(job, {"n": 1}, job_id=ids["timed"], dedup_key=timed_key)
            task = asyncio.create_task(
                pub.publish(job, {"n": 2}, job_id=ids["cut"], dedup_key=cut_key)
            )
            await asyncio.sleep(0.3)  # sent; its confirm is held back
            assert not task.done()
            assert proxy.cut() >= 1
            proxy.flowing.set()
            with pytest.raises(ConnectionLost):
                await task
            held_at = time.monotonic()
            assert await dedup.holder(timed_key) == ids["timed"]
            assert await dedup.holder(cut_key) == ids["cut"]
            # A retry in the meantime gets the first id and sends nothing.
            assert await pub.publish(job, {"n": 3}, dedup_key=timed_key) == ids["timed"]
            assert await pub.publish(job, {"n": 4}, dedup_key=cut_key) == ids["cut"]
            while await dedup.holder(timed_key) or await dedup.holder(cut_key):
                assert time.monotonic() - held_at < 5, "the pending claim outlived its TTL"
                await asyncio.sleep(0.1)
    finally:
        await proxy.stop()
    # Free: the next publish with the key is a new job (a publisher not behind the cut proxy).
    async with Publisher(broker.url, status_url=STATUS_URL) as pub:
        again = await pub.publish(job, {"n": 5}, dedup_key=timed_key)
    keys.append(again)
    assert again != ids["timed"]
    got = sorted(m["properties"]["message_id"] for m in broker.get_messages(queue))
    assert got == sorted([ids["timed"], ids["cut"], again])


async def test_a_nack_frees_the_key_at_once(broker: Broker, keys: list[str]) -> None:
    """A queue full with ``reject-publish``: the broker nacks (RefusedError), a stated refusal,
    so the key is free at once and a later publish with it goes out."""
    queue = f"pdedup_{uuid.uuid4().hex[:6]}"
    job = f"{queue}_job"
    connection = await aio_pika.connect(broker.url)
    try:
        channel = await connection.channel()
        q = await channel.declare_queue(
            queue, durable=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
        )
        exchange = await channel.declare_exchange(
            "jobs", aio_pika.ExchangeType.DIRECT, durable=True, passive=True
        )
        await q.bind(exchange, routing_key=job)
    finally:
        await connection.close()
    key = f"n-{uuid.uuid4().hex[:8]}"
    keys.append(key)
    async with Publisher(broker.url, status_url=STATUS_URL) as pub:
        keys.append(await pub.publish(job, {"n": 0}))  # the queue is full now
        with pytest.raises(RefusedError):
            await pub.publish(job, {"n": 1}, dedup_key=key)
        assert await pub._dedup_store().holder(key) is None


async def test_a_confirmed_publish_whose_claim_extension_fails_returns_its_id(
    broker: Broker, keys: list[str]
) -> None:
    """The broker confirmed the job, then Redis fails the write that extends the claim: the
    publish returns the id (the job is queued; an error would make the caller publish it
    again) and logs a warning; the pending claim still holds the key."""
    queue, job = await _queue(broker)
    key = f"x-{uuid.uuid4().hex[:8]}"
    keys.append(key)
    async with Publisher(broker.url, status_url=STATUS_URL) as pub:
        real = pub._dedup_store()
        broken = pub._dedup = DedupStore(real.client, ttl=real.ttl)
        broken._extend = real.client.register_script(
            "return redis.error_reply('ERR the test fails the extension')"
        )
        with capture_logs() as logs:
            job_id = await pub.publish(job, {"n": 1}, dedup_key=key)
        keys.append(job_id)
        assert await broken.holder(key) == job_id
        assert 0 < await real.client.ttl(real.claim_key(key)) <= real.pending_ttl
        assert [e for e in logs if e["log_level"] == "warning" and e.get("job_id") == job_id]
    assert [m["properties"]["message_id"] for m in broker.get_messages(queue)] == [job_id]
