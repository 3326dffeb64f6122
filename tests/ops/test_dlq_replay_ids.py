"""A replay never has two copies of one message_id in flight (returns are matched by id)."""

from __future__ import annotations

import collections

import pytest

from leveret.consumer.ops import dlq as dlq_module
from leveret.consumer.ops.dlq import DeadLetters
from tests.ops.helpers import declare_queue, drain, fill_dlq
from tests.support import Broker, unique


async def test_a_dlq_holding_one_id_twice_replays_them_one_after_the_other(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both copies move, and the client never has both in flight at once."""
    queue = unique("dupid")
    await declare_queue(broker.url, queue)
    first = await fill_dlq(broker.url, queue, 20)
    second = await fill_dlq(broker.url, queue, 20)  # the same ids again: a job that died twice
    assert [s.id for s in first] == [s.id for s in second]

    in_flight: collections.Counter[str] = collections.Counter()
    most = 0
    # Every confirmed publish is a batch of one (producers' one publish path): watch the call
    # the replay makes for each copy, from send to confirm.
    publish = dlq_module.publish_confirmed

    async def watched(channel, body: bytes, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal most
        message_id = kwargs["properties"].message_id
        in_flight[message_id] += 1
        most = max(most, in_flight[message_id])
        try:
            return await publish(channel, body, **kwargs)
        finally:
            in_flight[message_id] -= 1

    monkeypatch.setattr(dlq_module, "publish_confirmed", watched)
    async with DeadLetters(broker.settings(), queue) as dead_letters:
        moved = await dead_letters.replay()
    monkeypatch.undo()

    assert moved == 40
    assert most == 1, "two publishes with one message_id were in flight together"
    replayed = await drain(broker.url, queue)
    assert sorted(m.id for m in replayed) == sorted(s.id for s in first + second)
    assert await broker.depth(f"{queue}.dlq") == 0
