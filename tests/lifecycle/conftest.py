"""Redis for the lifecycle tests: the shared server under a private prefix, or a private server.

The shared Redis on 127.0.0.1:6379 is never flushed or stopped: each test writes under its own
key prefix and deletes its keys afterwards. Tests that stop Redis start their own
``redis-server`` on a free port instead.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from leveret.producers.stores.status import MemoryStatusStore, RedisStatusStore, StatusStore

SHARED_REDIS = "redis://127.0.0.1:6379/0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """A ``redis-server`` subprocess that a test may stop and start again on the same port.

    It saves to its own directory on shutdown, so a restart keeps what was written before (as a
    production Redis with persistence would).
    """

    def __init__(self, directory: Path) -> None:
        self.port = _free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--dir", str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("private redis-server did not start") from None
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        """Shut down, saving the data set first (``SHUTDOWN SAVE``)."""
        if self.process is None:
            return
        # No client retries: the server closing the connection is the answer to SHUTDOWN.
        client = redis.Redis(port=self.port, retry=Retry(NoBackoff(), 0))
        with contextlib.suppress(redis.ConnectionError):
            client.shutdown(save=True)
        client.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.process = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        if server.process is not None:
            server.process.kill()
            server.process.wait(5)


def unique_prefix() -> str:
    return f"leveret-test:{uuid.uuid4().hex[:10]}:"


@contextlib.asynccontextmanager
async def shared_redis_store(ttl: int = 604800) -> AsyncIterator[RedisStatusStore]:
    """A store on the shared Redis under a fresh prefix; its keys are deleted afterwards."""
    store = RedisStatusStore.from_url(SHARED_REDIS, ttl=ttl, prefix=unique_prefix())
    try:
        yield store
    finally:
        keys = [key async for key in store.client.scan_iter(match=store.prefix + "*")]
        if keys:
            await store.client.delete(*keys)
        await store.close()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StatusStore]:
    """Each store semantics test runs on both stores."""
    if request.param == "memory":
        yield MemoryStatusStore()
    else:
        async with shared_redis_store() as redis_store:
            yield redis_store
