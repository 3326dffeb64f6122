"""The API served for real: uvicorn on a free port in a thread, the real broker (a vhost of the
run's own) and the shared Redis under a private key prefix.

The server runs on its own event loop in its own thread, exactly as ``leveret api`` runs it;
tests talk to it only over HTTP (httpx) and look at the broker and Redis with their own clients.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from pydantic import BaseModel, Field

from leveret.consumer import JobContext, Worker, WorkerSettings
from leveret.consumer.api import ApiSettings, create_app
from leveret.producers.stores.cancel import RedisCancelMarks
from leveret.producers.stores.dedup import DedupStore
from leveret.producers.stores.status import RedisStatusStore
from tests.support import Broker

SHARED_REDIS = "redis://127.0.0.1:6379/0"
TOKEN = "t0ken-for-tests-" + uuid.uuid4().hex


class Email(BaseModel):
    to: str = Field(min_length=3)
    subject: str


class Resize(BaseModel):
    width: int = Field(ge=1, le=10_000)
    height: int = Field(ge=1, le=10_000)


def make_worker(settings: WorkerSettings, ran: list[Any] | None = None) -> Worker:
    """The app the API serves: two typed jobs and one dict job, each on its own queue."""
    worker = Worker(settings)

    @worker.job("send_email", queue="api_email", max_attempts=1)
    async def send_email(email: Email, ctx: JobContext) -> None:
        if ran is not None:
            ran.append((ctx.job_id, email))

    @worker.job("resize", queue="api_images", max_attempts=1)
    async def resize(size: Resize) -> None:
        pass

    @worker.job("free_form", queue="api_misc", max_attempts=1)
    async def free_form(data: dict[str, Any]) -> None:
        pass

    return worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    url: str
    app: Any
    server: uvicorn.Server

    def client(self, token: str | None = TOKEN, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)

    @property
    def state(self) -> Any:
        return self.app.state.leveret


@contextlib.contextmanager
def serve(app: Any) -> Iterator[Served]:
    """Run ``app`` under uvicorn on a free port until the block ends."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                            access_log=False, lifespan="on")  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield Served(f"http://127.0.0.1:{port}", app, server)
    finally:
        server.should_exit = True
        thread.join(30)


def purge(broker: Broker, *queues: str) -> None:
    """Empty queues the session's earlier tests (schemathesis among them) published into."""
    for queue in queues:
        broker.api("DELETE", f"/queues/{broker.qvhost}/{queue}/contents")


def wait_connected(served: Served, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not served.state.connected:
        if time.monotonic() > deadline:
            raise AssertionError("the API did not connect to the broker")
        time.sleep(0.05)


@dataclass
class RedisParts:
    """Stores under one private prefix: the server's (used on its loop only) and the prefix."""

    prefix: str

    def server_stores(self, ttl: int = 3600) -> dict[str, Any]:
        status = RedisStatusStore.from_url(SHARED_REDIS, ttl=ttl, prefix=self.prefix + "status:")
        return {
            "status_store": status,
            "cancel_marks": RedisCancelMarks(
                status.client, ttl=ttl, prefix=self.prefix + "cancel:"
            ),
            "dedup_store": DedupStore(status.client, ttl=ttl, prefix=self.prefix),
        }

    def test_store(self, ttl: int = 3600) -> RedisStatusStore:
        return RedisStatusStore.from_url(SHARED_REDIS, ttl=ttl, prefix=self.prefix + "status:")


@pytest.fixture
async def redis_parts() -> AsyncIterator[RedisParts]:
    parts = RedisParts(f"leveret-test:{uuid.uuid4().hex[:10]}:")
    yield parts
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(SHARED_REDIS)
    keys = [key async for key in client.scan_iter(match=parts.prefix + "*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
def api_settings() -> ApiSettings:
    return ApiSettings(api_token=TOKEN, api_max_body=64 * 1024)


def build(broker: Broker, redis: RedisParts | None, registry: Any, **kwargs: Any) -> Any:
    ran: list[Any] = kwargs.pop("ran", None)
    settings = kwargs.pop("settings", None) or ApiSettings(api_token=TOKEN, api_max_body=65536)
    worker = make_worker(broker.settings(), ran)
    stores = redis.server_stores() if redis is not None else {}
    return create_app(worker, settings, registry=registry, metrics_port=0, **stores, **kwargs)
