"""examples/orders on the real RabbitMQ and Redis: orders POSTed to the real HTTP API (the app
``leveret api`` serves, under uvicorn on a free port), run by a real worker in this process.

It uses a vhost of its own (the app's queue names are fixed: ``email``, ``orders``, ... may
exist in the session's shared vhost) and Redis database 5, where every key it made is deleted
afterwards. Order ids are fresh per run, so no done mark of an earlier run can skip a step.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
import uvicorn
from prometheus_client import CollectorRegistry

from examples.orders.app import build, group_id_of
from examples.orders.services import DECLINED_CARD, GOOD_CARD, TIMEOUT_CARD, Services
from leveret.consumer.api import ApiSettings, create_app
from leveret.producers import Publisher
from leveret.producers.stores.settings import LifecycleSettings
from tests import support
from tests.support import Broker, running, unique, wait_for

STATUS_URL = "redis://127.0.0.1:6379/5"
TOKEN = "orders-example-token"


@pytest.fixture
def own_broker() -> Iterator[Broker]:
    with support.test_broker() as b:
        yield b


@pytest.fixture
def redis_db5() -> Iterator[redis.Redis]:
    """Database 5; the keys that appeared during the test are deleted after it."""
    client = redis.Redis.from_url(STATUS_URL)
    before = set(client.scan_iter(count=1000))
    try:
        yield client
    finally:
        made = set(client.scan_iter(count=1000)) - before
        if made:
            client.delete(*made)
        client.close()


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """``app`` under uvicorn on a free port, in a thread, until the block ends."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-orders", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def _post(client: httpx.Client, order: dict[str, Any]) -> httpx.Response:
    """POST /jobs/place_order; 503 while the API still connects to the broker."""
    deadline = time.monotonic() + 20
    while True:
        response = client.post("/jobs/place_order", json=order)
        if response.status_code != 503 or time.monotonic() > deadline:
            return response
        time.sleep(0.1)


async def test_orders_through_the_api_and_a_real_worker(
    own_broker: Broker, redis_db5: redis.Redis
) -> None:
    run = uuid.uuid4().hex[:8]
    exchange = unique("orders")
    services = Services.default(hold_s=0.2)  # long enough that unlocked runs would overlap
    settings = own_broker.settings(exchange=exchange, status_url=STATUS_URL)
    worker = build(settings, services, registry=CollectorRegistry())

    def order(n: int, sku: str, card: str = GOOD_CARD) -> dict[str, Any]:
        return {"order_id": f"{run}-{n}", "sku": sku, "qty": 1, "card": card,
                "email": f"buyer{n}@example.com"}  # fmt: skip

    orders = [
        order(1, "LEV-MUG"),
        order(2, "LEV-MUG", TIMEOUT_CARD),  # retried once
        order(3, "LEV-MUG"),
        order(4, "LEV-TEE"),
        order(5, "LEV-CAP", DECLINED_CARD),  # dead, rejected; never done
    ]
    good = [o["order_id"] for o in orders[:4]]
    api = create_app(
        worker,  # the API loads the app as `leveret api` does: its jobs, queues and models
        ApiSettings(api_token=TOKEN),
        lifecycle=LifecycleSettings(status_url=STATUS_URL),
        registry=CollectorRegistry(),
        metrics_port=0,
    )
    started = time.monotonic()
    with (
        serve(api) as url,
        httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
        ) as client,
    ):
        bad = await asyncio.to_thread(client.post, "/jobs/place_order", json={"order_id": "x"})
        assert bad.status_code == 422, bad.text  # the request's shape is checked at the door
        async with running(worker):
            posted = [await asyncio.to_thread(_post, client, o) for o in orders]
            assert [p.status_code for p in posted] == [202] * 5, [p.text for p in posted]
            await wait_for(lambda: len(services.book.completed) >= 4, 40, "four orders done")
            await wait_for(lambda: own_broker.depth("payments.dlq"), 20, "the declined charge")
            await asyncio.sleep(0.5)  # room for a duplicate to show up

            async with Publisher(settings=settings, status_url=STATUS_URL) as pub:
                for o, p in zip(orders, posted, strict=True):
                    status = await pub.status(p.json()["id"])
                    assert status is not None and status.state == "succeeded", (o, status)
                for order_id in good:
                    group = await pub.group_status(group_id_of(order_id))
                    assert group is not None and group.then_state == "succeeded", group
                    assert group.counts["succeeded"] == 2
                assert await pub.group_status(group_id_of(orders[4]["order_id"])) is None
    elapsed = time.monotonic() - started

    # Each good order done exactly once, complete; the declined one never.
    done = Counter(r["order_id"] for r in services.book.completed)
    assert done == dict.fromkeys(good, 1), done
    assert {r["state"] for r in services.book.completed} == {"complete"}
    mailed = sorted(to for to, _ in services.mailer.sent)
    assert mailed == [f"buyer{n}@example.com" for n in (1, 2, 3, 4)]
    # Charged once each; the timeout card took two calls; the declined card one.
    assert services.payments.charges == {good[0]: 1200, good[1]: 1200, good[2]: 1200,
                                          good[3]: 2500}  # fmt: skip
    calls = Counter(services.payments.calls)
    assert calls[good[1]] == 2 and calls[orders[4]["order_id"]] == 1
    assert all(calls[g] == 1 for g in (good[0], good[2], good[3]))
    (dead,) = own_broker.get_messages("payments.dlq", 5)
    assert dead["properties"]["headers"]["x-reason"] == "rejected"
    assert "CardDeclined" in dead["properties"]["headers"]["x-error"]

    # No two reservations of one SKU overlapped: by the recorded times, and as seen live.
    assert services.stock.overlaps == []
    by_sku: dict[str, list[tuple[float, float]]] = {}
    for r in services.stock.reservations:
        by_sku.setdefault(r.sku, []).append((r.started, r.ended))
    assert len(by_sku["LEV-MUG"]) == 3
    for sku, spans in by_sku.items():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end, f"two reservations of {sku} overlapped: {spans}"
    assert services.stock.levels == {"LEV-MUG": 97, "LEV-TEE": 99, "LEV-CAP": 99}
    assert elapsed < 45
