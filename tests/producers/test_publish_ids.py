"""Returned publishes are matched by message_id, so no two publishes share an id in flight."""

from __future__ import annotations

import asyncio

import pytest

from leveret.producers import Job, Publisher, UnroutableError
from tests.producers.test_publisher import _declare
from tests.support import Broker, unique


async def test_publish_many_refuses_a_repeated_id_and_sends_nothing(broker: Broker) -> None:
    """A batch that reuses an explicit id is refused before the first job is sent."""
    queue = unique("ids")
    await _declare(broker, queue, f"{queue}-job")
    async with Publisher(broker.url) as pub:
        with pytest.raises(ValueError, match="appears twice"):
            await pub.publish_many(
                [
                    Job(job=f"{queue}-nobody", payload={}, job_id="same-id"),
                    Job(job=f"{queue}-job", payload={}, job_id="same-id"),
                ]
            )
    assert await broker.depth(queue) == 0


async def test_the_unroutable_one_of_two_same_id_publishes_is_the_one_that_fails(
    broker: Broker,
) -> None:
    """Concurrent publishes with one id: the returned job raises, the routed one succeeds."""
    queue = unique("ids")
    await _declare(broker, queue, f"{queue}-job")
    async with Publisher(broker.url) as pub:
        unroutable, routed = await asyncio.gather(
            pub.publish(f"{queue}-nobody", {"n": 1}, job_id="shared"),
            pub.publish(f"{queue}-job", {"n": 2}, job_id="shared"),
            return_exceptions=True,
        )
    assert isinstance(unroutable, UnroutableError), unroutable
    assert routed == "shared"
    assert await broker.depth(queue) == 1


def test_new_job_ids_are_uuid4_text() -> None:
    """``new_job_id`` (made without a ``UUID`` object) is what ``str(uuid.uuid4())`` gives:
    version 4, the RFC 4122 variant, canonical text; and no two alike."""
    import uuid

    from leveret.producers.wire.message import new_job_id

    ids = [new_job_id() for _ in range(5_000)]
    assert len(set(ids)) == len(ids)
    for job_id in ids:
        parsed = uuid.UUID(job_id)
        assert str(parsed) == job_id
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
