"""The worker's operator hooks: the DLQ depth gauge and the doctor's findings at start."""

from __future__ import annotations

import aio_pika
import structlog
from prometheus_client import CollectorRegistry, Gauge
from pydantic import BaseModel
from structlog.testing import capture_logs

from leveret.consumer import Worker
from leveret.consumer.runtime.dlq_depth import DlqDepthRefresher
from tests.ops.helpers import declare_queue, fill_dlq
from tests.ops.test_doctor import broker_consumer_timeout_s
from tests.support import running, unique, wait_for


class Payload(BaseModel):
    n: int


def gauge_value(registry: CollectorRegistry, queue: str) -> float | None:
    return registry.get_sample_value("leveret_dlq_messages", {"queue": queue})


async def test_refresher_tracks_dlq_depth_and_survives_a_missing_dlq(broker, registry):
    """The gauge follows Q.dlq's depth on each tick; a queue without a DLQ is skipped."""
    queue, missing = unique("depth"), unique("nodlq")
    await declare_queue(broker.url, queue)
    await fill_dlq(broker.url, queue, 5)
    gauge = Gauge("leveret_dlq_messages", "test", ["queue"], registry=registry)
    refresher = DlqDepthRefresher([missing, queue], gauge, interval_s=0.2)
    connection = await aio_pika.connect(broker.url)
    try:
        refresher.start()
        refresher.attach(connection)
        await wait_for(lambda: gauge_value(registry, queue) == 5, 10, "the first refresh")
        await fill_dlq(broker.url, queue, 3, prefix="more")
        await wait_for(lambda: gauge_value(registry, queue) == 8, 10, "a later refresh")
        assert gauge_value(registry, missing) is None
    finally:
        await refresher.stop()
        await connection.close()


async def test_worker_exports_dlq_depth_and_logs_doctor_findings(broker, registry):
    """A running worker reports its DLQ depth and logs doctor findings without failing."""
    queue = unique("wops")
    worker = Worker(broker.settings(), registry=registry)
    limit_s = broker_consumer_timeout_s(broker)

    @worker.job(f"{queue}-slow", queue=queue, timeout=limit_s + 60)
    async def slow(p: Payload) -> None:
        pass

    await declare_queue(broker.url, queue, jobs=(f"{queue}-slow",))
    await fill_dlq(broker.url, queue, 4)
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with running(worker):
            await wait_for(lambda: gauge_value(registry, queue) == 4, 10, "the DLQ depth gauge")
            await wait_for(
                lambda: any(e["event"] == "doctor_finding" and e["log_level"] == "error"
                            for e in logs),
                20, "the doctor's findings",
            )  # fmt: skip
            assert worker.ready
    [error] = [e for e in logs if e["event"] == "doctor_finding" and e["log_level"] == "error"]
    assert error["check"] == "consumer_timeout"
    assert f"{queue}-slow" in error["finding"]
