"""The worker's lifecycle events on the real broker: every state, its fields, results, modes.

Each test runs on an exchange of its own (so its ``<exchange>.events`` carries only its jobs) and
binds a test queue to the events exchange with ``#``, as any subscriber would.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from leveret.consumer import JobContext, Worker
from leveret.producers import Publisher
from leveret.producers.settings import ConnectionSettings
from leveret.producers.wire.events import events_exchange
from leveret.topology.errors import InvalidValueError
from tests.support import Broker, assert_queue_types, running, unique, wait_for


class Listener:
    """A queue bound to ``<exchange>.events`` with ``#``; collects parsed bodies in order."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.keys: list[str] = []
        self.content_types: set[str | None] = set()

    def of(self, job_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["job_id"] == job_id]

    def states(self, job_id: str) -> list[str]:
        return [e["state"] for e in self.of(job_id)]


@pytest.fixture
async def exchange(broker: Broker) -> AsyncIterator[str]:
    yield unique("ex")


@pytest.fixture
async def listener(broker: Broker, exchange: str) -> AsyncIterator[Listener]:
    connection = await aio_pika.connect(broker.url)
    channel = await connection.channel()
    events = await channel.declare_exchange(
        events_exchange(exchange), aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(events, "#")
    got = Listener()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        got.events.append(json.loads(message.body))
        got.keys.append(message.routing_key or "")
        got.content_types.add(message.content_type)
        await message.ack()

    await queue.consume(on_message)
    try:
        yield got
    finally:
        await connection.close()


def publisher(broker: Broker, exchange: str) -> Publisher:
    return Publisher(settings=ConnectionSettings(amqp_url=broker.url, exchange=exchange))


class Thumb(BaseModel):
    url: str
    size: int


async def test_each_state_reaches_the_events_exchange_with_the_contract_fields(
    broker: Broker,
    exchange: str,
    listener: Listener,
    registry: CollectorRegistry,
    queue_type: str,
) -> None:
    queue = unique("q")
    worker = Worker(broker.settings(exchange=exchange, events="all"), registry=registry)

    @worker.job(f"{queue}-ok", queue=queue)
    async def ok(payload: dict[str, Any], ctx: JobContext) -> Thumb:
        await ctx.progress(0.5, "half way")
        return Thumb(url="s3://x", size=3)

    @worker.job(f"{queue}-bad", queue=queue, max_attempts=2, backoff=0)
    async def bad(payload: dict[str, Any]) -> None:
        raise ValueError("boom\nsecond line")

    async with running(worker), publisher(broker, exchange) as pub:
        assert_queue_types(broker, queue, queue_type)
        ok_id = await pub.publish(f"{queue}-ok", {})
        bad_id = await pub.publish(f"{queue}-bad", {})
        # A message no handler can run: wrong content type; dead with attempt 0.
        raw_id = unique("raw")
        channel = await pub._connection.channel()  # type: ignore[union-attr]
        ex = await channel.get_exchange(exchange)
        await ex.publish(
            aio_pika.Message(
                b"x", content_type="text/plain", message_id=raw_id, type=f"{queue}-ok"
            ),
            routing_key=f"{queue}-ok",
        )
        await wait_for(
            lambda: (
                "succeeded" in listener.states(ok_id)
                and "dead" in listener.states(bad_id)
                and listener.states(raw_id)
            ),
            20,
            "every outcome event",
        )
        await asyncio.sleep(0.2)  # a late best-effort event would show up now

    before = datetime.now(UTC) - timedelta(minutes=5)
    assert listener.content_types == {"application/json"}
    ok_events = listener.of(ok_id)
    assert sorted(e["state"] for e in ok_events) == ["progress", "started", "succeeded"]
    for e in ok_events:
        assert e["job"] == f"{queue}-ok" and e["queue"] == queue and e["attempt"] == 1
        assert datetime.fromisoformat(e["at"]) > before and e["at"].endswith("Z")
    by_state = {e["state"]: e for e in ok_events}
    assert set(by_state["started"]) == {"job_id", "job", "queue", "state", "attempt", "at"}
    assert by_state["progress"]["progress"] == 0.5
    assert by_state["progress"]["message"] == "half way"
    assert by_state["succeeded"]["result"] == {"url": "s3://x", "size": 3}  # pydantic dumped
    assert by_state["succeeded"]["duration_s"] >= 0
    assert "error" not in by_state["succeeded"]

    bad_events = [e for e in listener.of(bad_id) if e["state"] != "started"]
    assert [(e["state"], e["attempt"]) for e in bad_events] == [("retrying", 1), ("dead", 2)]
    for e in bad_events:
        assert e["error"] == "ValueError: boom second line"  # one line
        assert e["duration_s"] >= 0 and "result" not in e
    assert [(e["state"], e["attempt"]) for e in listener.of(raw_id)] == [("dead", 0)]
    assert "content type" in listener.of(raw_id)[0]["error"]
    assert "duration_s" not in listener.of(raw_id)[0]
    # Routing keys are <job>.<state>.
    assert f"{queue}-ok.succeeded" in listener.keys and f"{queue}-bad.retrying" in listener.keys


async def test_a_result_over_the_limit_is_null_and_the_job_still_succeeds(
    broker: Broker, exchange: str, listener: Listener, registry: CollectorRegistry
) -> None:
    queue = unique("q")
    worker = Worker(
        broker.settings(exchange=exchange, events="outcomes", result_max_bytes=100),
        registry=registry,
    )

    @worker.job(f"{queue}-job", queue=queue)
    async def job(payload: dict[str, Any]) -> Any:
        return "x" * payload["n"]

    async with running(worker), publisher(broker, exchange) as pub:
        small = await pub.publish(f"{queue}-job", {"n": 10})
        big = await pub.publish(f"{queue}-job", {"n": 1000})
        await wait_for(lambda: listener.states(small) and listener.states(big), 20, "both outcomes")
    assert listener.of(small) == [listener.of(small)[0]]
    assert listener.of(small)[0]["result"] == "x" * 10
    assert listener.of(big)[0]["state"] == "succeeded"
    assert listener.of(big)[0]["result"] is None
    # outcomes mode: no started event at all
    assert all(e["state"] != "started" for e in listener.events)


async def test_events_off_publishes_nothing(
    broker: Broker, exchange: str, listener: Listener, registry: CollectorRegistry
) -> None:
    queue = unique("q")
    worker = Worker(broker.settings(exchange=exchange, events="off"), registry=registry)
    done: list[str] = []

    @worker.job(f"{queue}-job", queue=queue)
    async def job(payload: dict[str, Any], ctx: JobContext) -> int:
        await ctx.progress(1.0)
        done.append(ctx.job_id)
        return 1

    async with running(worker), publisher(broker, exchange) as pub:
        job_id = await pub.publish(f"{queue}-job", {})
        await wait_for(lambda: job_id in done, 20, "the run")
        await asyncio.sleep(0.5)
    assert listener.events == []


async def test_max_attempts_override_per_publish(
    broker: Broker, exchange: str, listener: Listener, registry: CollectorRegistry
) -> None:
    queue = unique("q")
    worker = Worker(broker.settings(exchange=exchange, events="outcomes"), registry=registry)
    seen: list[tuple[str, int, int]] = []

    @worker.job(f"{queue}-job", queue=queue, max_attempts=5, backoff=0)
    async def job(payload: dict[str, Any], ctx: JobContext) -> None:
        seen.append((ctx.job_id, ctx.attempt, ctx.max_attempts))
        raise RuntimeError("always")

    async with running(worker), publisher(broker, exchange) as pub:
        with pytest.raises(InvalidValueError):
            await pub.publish(f"{queue}-job", {}, max_attempts=0)
        one = await pub.publish(f"{queue}-job", {}, max_attempts=1)
        two = await pub.publish(f"{queue}-job", {}, max_attempts=2)
        # A bad header from a foreign publisher: invalid, dead without a run.
        channel = await pub._connection.channel()  # type: ignore[union-attr]
        ex = await channel.get_exchange(exchange)
        raw = unique("raw")
        await ex.publish(
            aio_pika.Message(
                b"{}",
                content_type="application/json",
                message_id=raw,
                headers={"x-max-attempts": "lots"},
            ),
            routing_key=f"{queue}-job",
        )
        await wait_for(
            lambda: (
                "dead" in listener.states(one)
                and "dead" in listener.states(two)
                and "dead" in listener.states(raw)
            ),
            20,
            "the three dead events",
        )
    assert [(s, a) for s, a in [(e["state"], e["attempt"]) for e in listener.of(one)]] == [
        ("dead", 1)
    ]
    # A run's event goes out once its copies are confirmed, and with backoff=0 the retry may run
    # and die before the first run's event is out: by attempt, not by arrival (docs/lifecycle).
    assert sorted((e["attempt"], e["state"]) for e in listener.of(two)) == [
        (1, "retrying"),
        (2, "dead"),
    ]
    assert {(a, m) for i, a, m in seen if i == one} == {(1, 1)}
    assert {(a, m) for i, a, m in seen if i == two} == {(1, 2), (2, 2)}
    assert not [s for s in seen if s[0] == raw]
    assert "x-max-attempts" in listener.of(raw)[0]["error"]
    assert listener.of(raw)[0]["attempt"] == 0


async def test_chained_jobs_are_published_only_after_success(
    broker: Broker, exchange: str, listener: Listener, registry: CollectorRegistry
) -> None:
    queue = unique("q")
    worker = Worker(broker.settings(exchange=exchange, events="outcomes"), registry=registry)
    children: list[tuple[str, dict[str, Any]]] = []
    returned: dict[str, str] = {}

    @worker.job(f"{queue}-parent", queue=queue, max_attempts=1)
    async def parent(payload: dict[str, Any], ctx: JobContext) -> None:
        child = await ctx.enqueue(f"{queue}-child", {"from": ctx.job_id}, priority=1)
        returned[ctx.job_id] = child
        if payload.get("fail"):
            raise RuntimeError("no follow-ups for me")

    @worker.job(f"{queue}-child", queue=queue)
    async def child(payload: dict[str, Any], ctx: JobContext) -> None:
        children.append((ctx.job_id, payload))

    async with running(worker), publisher(broker, exchange) as pub:
        good = await pub.publish(f"{queue}-parent", {})
        failed = await pub.publish(f"{queue}-parent", {"fail": True})
        await wait_for(lambda: children and "dead" in listener.states(failed), 20, "a child")
        await asyncio.sleep(0.5)
    assert children == [(returned[good], {"from": good})]  # the id enqueue returned at once
    assert not listener.states(returned[failed])  # never published
    # The child's own events follow the parent's succeeded event.
    assert listener.states(returned[good]) == ["succeeded"]


async def test_queue_wait_is_observed_once_per_job_and_cancelled_is_reserved(
    broker: Broker, exchange: str, registry: CollectorRegistry
) -> None:
    queue = unique("q")
    worker = Worker(broker.settings(exchange=exchange), registry=registry)
    runs: list[int] = []

    @worker.job(f"{queue}-job", queue=queue, max_attempts=2, backoff=0)
    async def job(payload: dict[str, Any], ctx: JobContext) -> None:
        runs.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("once")

    labels = {"queue": queue, "job_name": f"{queue}-job"}
    async with publisher(broker, exchange) as pub:
        # Published before the worker starts: it waits in the queue for a while.
        await worker_topology(broker, worker)
        await pub.publish(f"{queue}-job", {})
        await asyncio.sleep(0.3)
        async with running(worker):
            await wait_for(lambda: runs == [1, 2], 20, "both runs")
    count = registry.get_sample_value("leveret_job_queue_wait_seconds_count", labels)
    total = registry.get_sample_value("leveret_job_queue_wait_seconds_sum", labels)
    assert count == 1  # the retry is not a second wait
    assert total is not None and 0.3 <= total < 30
    cancelled = registry.get_sample_value(
        "leveret_jobs_completed_total", {**labels, "outcome": "cancelled"}
    )
    assert cancelled == 0.0


async def worker_topology(broker: Broker, worker: Worker) -> None:
    from leveret.topology.declare import declare

    connection = await aio_pika.connect(broker.url)
    async with connection:
        await declare(connection, worker.topology)
