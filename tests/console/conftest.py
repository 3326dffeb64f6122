"""The console served for real: the API of tests/api (uvicorn in a thread, the run's vhost, the
shared Redis under a private prefix) with a schedule added, and Debian's Chromium driven by
Playwright. No Chromium is a failure, never a skip: the contract says the console is tested in a
real browser.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from leveret.consumer.api import ApiSettings, create_app
from tests.api.conftest import (
    SHARED_REDIS,
    TOKEN,
    RedisParts,
    Served,
    make_worker,
    purge,
    serve,
    wait_connected,
)
from tests.support import Broker

CHROMIUM = os.environ.get("LEVERET_CHROMIUM", "/usr/bin/chromium")
IMG = Path(__file__).resolve().parents[2] / "docs" / "img"
QUEUES = ("api_email", "api_images", "api_misc")


def console_worker(broker: Broker) -> Any:
    worker = make_worker(broker.settings())
    worker.schedule("free_form", every=3600, name="hourly_report", payload={"kind": "report"})
    worker.schedule("resize", cron="0 3 * * *", tz="Europe/Paris", name="nightly_thumbs",
                    payload={"width": 64, "height": 64})  # fmt: skip
    return worker


def _clean_redis(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(SHARED_REDIS)
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="module")
def console(broker: Broker) -> Iterator[Served]:
    """The API with its console, signed-in-able with ``TOKEN``, connected to the broker."""
    parts = RedisParts(f"leveret-test:{uuid.uuid4().hex[:10]}:")
    app = create_app(
        console_worker(broker),
        ApiSettings(api_token=TOKEN, api_max_body=65536),
        registry=CollectorRegistry(),
        metrics_port=0,
        **parts.server_stores(),
    )
    try:
        with serve(app) as served:
            wait_connected(served)
            purge(broker, *QUEUES, *(f"{q}.dlq" for q in QUEUES))
            served.redis_prefix = parts.prefix  # type: ignore[attr-defined]
            yield served
    finally:
        _clean_redis(parts.prefix)


def chromium_path() -> str:
    """Debian's Chromium; a clear failure when it is missing (scripts/setup.sh installs it)."""
    path = shutil.which(CHROMIUM) or (CHROMIUM if os.access(CHROMIUM, os.X_OK) else None)
    if path is None:
        pytest.fail(
            f"Chromium not found at {CHROMIUM}: the console's browser tests need it "
            "(apt-get install chromium, or bash scripts/setup.sh; LEVERET_CHROMIUM names another)",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=executable,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        yield b
        b.close()
