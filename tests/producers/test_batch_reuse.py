"""What made small batches cheap stays correct: a channel's templates are reused across
batches, and an event's timestamp made without ``datetime`` is the same text.

The worker settles a few jobs per loop turn, so ``publish_batch`` sees many small batches on
one channel; the templates built for the first one serve the rest (real broker, every id
consumed once with its own body).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import aio_pika
from pamqp.commands import Basic

from leveret.producers.broker.batch import _MARSHALLERS, publish_batch
from leveret.producers.wire.events import build_event, now, now_rfc3339, rfc3339
from tests.producers.test_batch import _declare
from tests.support import Broker, unique


@dataclass(frozen=True)
class _Item:
    """A copy as the worker's settle step sends one: fixed properties but the message id."""

    job: str
    job_id: str
    body: bytes
    properties: Basic.Properties
    exchange: str
    routing_key: str


async def test_small_batches_reuse_one_marshaller_and_every_job_lands_once(
    broker: Broker,
) -> None:
    """60 batches of 3 on one channel (a worker's few jobs per loop turn): one marshaller for
    the channel, one template and one publish frame in it (not one per batch), and all 180
    jobs in the queue, in order, each with its own id and body."""
    queue = unique("reuse")
    await _declare(broker, queue, f"{queue}-job")
    connection = await aio_pika.connect(broker.url)
    try:
        channel = await (
            await connection.channel(publisher_confirms=True, on_return_raises=True)
        ).get_underlay_channel()
        ids = [f"{i:032x}.succeeded.1" for i in range(180)]
        items = [
            _Item(
                "job",
                job_id,
                json.dumps({"n": i}).encode(),
                Basic.Properties(
                    content_type="application/json",
                    delivery_mode=2,
                    message_id=job_id,
                    message_type="job",
                ),
                "",
                queue,
            )
            for i, job_id in enumerate(ids)
        ]
        for first in range(0, 180, 3):
            await publish_batch(channel, items[first : first + 3], timeout=10)
            marshaller = _MARSHALLERS[channel]
            if first == 0:
                kept = marshaller
            assert marshaller is kept
        assert len(kept.publish_frames) == 1
        assert len(kept.templates) == 1 and None not in kept.templates.values()
    finally:
        await connection.close()
    assert await broker.depth(queue) == 180
    messages = broker.get_messages(queue, 180)
    assert [m["properties"]["message_id"] for m in messages] == ids
    assert [json.loads(m["payload"])["n"] for m in messages] == list(range(180))


def test_event_stamp_is_rfc3339_of_now() -> None:
    """``now_rfc3339`` gives ``rfc3339(now())``'s text: UTC, milliseconds, ``Z``, between two
    stamps taken around it; ``build_event`` uses it when no time is given."""
    for _ in range(200):
        before = rfc3339(now())
        stamp = now_rfc3339()
        after = rfc3339(now())
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp)
        assert before <= stamp <= after
    body = json.loads(
        build_event(job_id="a", job="j", queue="q", state="succeeded", attempt=1, duration_s=0.5)
    )
    fields = ["job_id", "job", "queue", "state", "attempt", "at", "duration_s", "result"]
    assert list(body) == fields
    assert before <= body["at"] <= rfc3339(now())
