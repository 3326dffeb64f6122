"""Plumbing for the operator-tool tests: declared layouts and DLQs filled like a worker does."""

from __future__ import annotations

import asyncio
import contextlib
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import aiormq

from leveret.topology import Topology, WorkQueue, declare
from leveret.topology.model import QueueType


@dataclass(frozen=True)
class Sent:
    """A message as it was put into a queue, to compare with what comes out."""

    id: str
    job: str
    body: bytes
    headers: dict[str, Any]


async def declare_queue(
    url: str,
    queue: str,
    jobs: tuple[str, ...] = ("job_a", "job_b"),
    queue_type: QueueType = "classic",
) -> None:
    """Declare the full Leveret layout for one work queue, of ``queue_type``."""
    connection = await aio_pika.connect(url)
    try:
        layout = WorkQueue(name=queue, jobs=jobs, queue_type=queue_type)
        await declare(connection, Topology(queues=(layout,)))
    finally:
        await connection.close()


def dead_headers(i: int, queue: str, *, reason: str = "exhausted",
                 died: datetime | None = None) -> dict[str, Any]:  # fmt: skip
    died = died or datetime.now(UTC)
    return {
        "x-reason": reason,
        "x-error": f"ValueError: boom number {i}",
        "x-attempts": 3 if reason == "exhausted" else 1,
        "x-died-at": died.isoformat(timespec="milliseconds"),
        "x-queue": queue,
        "x-redeliveries": 1,
        "trace-id": f"trace-{i}",
    }


async def fill_dlq(
    url: str,
    queue: str,
    count: int,
    *,
    job: str | Any = "job_a",
    reason: str | Any = "exhausted",
    died: Any = None,
    prefix: str = "job",
) -> list[Sent]:
    """Publish ``count`` dead-letter copies to ``queue.dlq`` with confirms, in order.

    ``job``, ``reason`` and ``died`` may be callables of the index, to make mixed DLQs.
    """
    sent: list[Sent] = []
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        raw = await channel.get_underlay_channel()
        batch: list[Any] = []
        for i in range(count):
            name = job(i) if callable(job) else job
            why = reason(i) if callable(reason) else reason
            when = died(i) if callable(died) else died
            message = Sent(
                id=f"{prefix}-{i:06d}",
                job=name,
                body=f'{{"n": {i}, "text": "payload {i}"}}'.encode(),
                headers=dead_headers(i, queue, reason=why, died=when),
            )
            sent.append(message)
            batch.append(
                raw.basic_publish(
                    message.body,
                    exchange="",
                    routing_key=f"{queue}.dlq",
                    properties=aiormq.spec.Basic.Properties(
                        content_type="application/json",
                        delivery_mode=2,
                        message_id=message.id,
                        message_type=name,
                        priority=i % 3 or None,
                        headers=message.headers,
                    ),
                    mandatory=True,
                )
            )
            if len(batch) >= 500:
                await asyncio.gather(*batch)
                batch = []
        if batch:
            await asyncio.gather(*batch)
    finally:
        await connection.close()
    return sent


@dataclass(frozen=True)
class Drained:
    id: str
    job: str | None
    body: bytes
    headers: dict[str, Any]
    priority: int | None
    redelivered: bool


async def drain(url: str, queue: str, timeout: float = 60) -> list[Drained]:
    """Take every message out of ``queue`` (destructively, no-ack consumer), in order."""
    out: list[Drained] = []
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        raw = await channel.get_underlay_channel()
        ok = await raw.queue_declare(queue, passive=True)
        total = ok.message_count or 0
        if not total:
            return out
        done = asyncio.Event()

        def take(message: aiormq.abc.DeliveredMessage) -> None:
            props = message.header.properties
            out.append(
                Drained(
                    id=props.message_id,
                    job=props.message_type,
                    body=bytes(message.body),
                    headers=dict(props.headers or {}),
                    priority=props.priority,
                    redelivered=message.delivery.redelivered,
                )
            )
            if len(out) >= total:
                done.set()

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            take(message)

        consumer = await raw.basic_consume(queue, on_message, no_ack=True)
        await asyncio.wait_for(done.wait(), timeout)
        await raw.basic_cancel(consumer.consumer_tag)
    finally:
        await connection.close()
    return out


def days_ago(days: float) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)


@contextlib.contextmanager
def app_module(tmp_path: Path, source: str, name: str = "opsapp") -> Iterator[str]:
    """Write an app module into ``tmp_path`` and yield its ``module:worker`` spec."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    yield f"{name}:worker"
