"""``BlockingPublisher`` has the publisher's group and runtime-schedule calls, without await."""

from __future__ import annotations

import uuid
from typing import Any

import redis

from leveret.producers import BlockingPublisher, Job
from leveret.producers.settings import ConnectionSettings
from tests.support import Broker, unique

STATUS_URL = "redis://127.0.0.1:6379/9"


def test_group_and_schedule_without_await(broker: Broker) -> None:
    exchange, queue = unique("bgx"), unique("bgq")
    with BlockingPublisher(
        settings=ConnectionSettings(amqp_url=broker.url, exchange=exchange), status_url=STATUS_URL
    ) as pub:
        # A queue for the members (declared through the management API: no worker here).
        broker.api(
            "PUT",
            f"/exchanges/{broker.qvhost}/{exchange}",
            json={"type": "direct", "durable": True},
        )
        broker.api("PUT", f"/queues/{broker.qvhost}/{queue}", json={"durable": True})
        broker.api(
            "POST",
            f"/bindings/{broker.qvhost}/e/{exchange}/q/{queue}",
            json={"routing_key": "member"},
        )
        broker.api(
            "POST",
            f"/bindings/{broker.qvhost}/e/{exchange}/q/{queue}",
            json={"routing_key": "report"},
        )
        group_id = pub.group([("member", {"n": 1}), ("member", {"n": 2})], then=Job("report", {}))
        status: Any = pub.group_status(group_id)
        assert status is not None and status.total == 2 and status.counts["pending"] == 2
        name = f"nightly-{uuid.uuid4().hex[:6]}"
        added = pub.schedule(name, "report", every=3600)
        assert added.name == name
        assert name in [s.name for s in pub.schedules()]
        assert pub.unschedule(name) is True
        assert name not in [s.name for s in pub.schedules()]
    broker.api("DELETE", f"/queues/{broker.qvhost}/{queue}")
    broker.api("DELETE", f"/exchanges/{broker.qvhost}/{exchange}")
    client = redis.Redis.from_url(STATUS_URL)
    keys = list(client.scan_iter(match=f"*{group_id}*")) + list(
        client.scan_iter(match=f"*{exchange}*")
    )
    if keys:
        client.delete(*keys)
    client.close()
