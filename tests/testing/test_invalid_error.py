"""TestBroker's ``invalid`` error is the line the real worker writes in ``x-error``: one line, the
same text, not pydantic's multi-line report."""

from __future__ import annotations

from pydantic import BaseModel

from leveret.consumer import Worker
from leveret.producers import Publisher
from leveret.testing import TestBroker
from tests.support import Broker, running, unique, wait_for


class Sum(BaseModel):
    a: int
    b: int


BAD = {"a": "not a number"}  # two errors: a is not an int, b is missing


def _app(broker: Broker, queue: str) -> Worker:
    worker = Worker(broker.settings())

    @worker.job(f"{queue}-sum", queue=queue, max_attempts=1)
    async def add(numbers: Sum) -> int:
        return numbers.a + numbers.b

    return worker


async def test_the_kits_invalid_error_is_the_real_workers_x_error(broker: Broker) -> None:
    queue = unique("kitinv")
    worker = _app(broker, queue)
    async with running(worker):
        async with Publisher(broker.url) as pub:
            job_id = await pub.publish(f"{queue}-sum", BAD)
        [dead] = await wait_for(lambda: broker.get_messages(f"{queue}.dlq"), 20, "the DLQ copy")
    headers = dead["properties"]["headers"]
    assert dead["properties"]["message_id"] == job_id
    assert headers["x-reason"] == "invalid"
    real = headers["x-error"]

    async with TestBroker(_app(broker, queue)) as kit:
        await kit.publish(f"{queue}-sum", BAD)
        await kit.join()
    [kit_dead] = kit.dead
    assert kit_dead.reason == "invalid"
    assert "\n" not in kit_dead.error
    assert kit_dead.error == real
