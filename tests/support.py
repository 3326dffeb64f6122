"""Shared test plumbing: a real broker with a vhost per test run, and worker helpers.

A run uses the broker in ``LEVERET_TEST_AMQP_URL`` or the one on 127.0.0.1:5672; it creates a
fresh vhost through the management API so runs never see each other's queues. Without a local
broker but with Docker, a RabbitMQ testcontainer is started instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import httpx
import pytest
from yarl import URL

from leveret.consumer import Worker, WorkerSettings

ROOT = Path(__file__).resolve().parent.parent

# Quorum queues before RabbitMQ 4.0 have no priorities (the broker ignores `priority` and keeps
# FIFO order); the contract excepts priorities there, so priority tests run on classic only.
CLASSIC_ONLY_PRIORITIES = pytest.mark.parametrize(
    "queue_type",
    [
        "classic",
        pytest.param(
            "quorum",
            marks=pytest.mark.skip(
                reason="quorum queues have no priorities before RabbitMQ 4.0 (CONTRACT: "
                "LEVERET_QUEUE_TYPE); doctor reports it, tests/ops/test_doctor_quorum.py checks it"
            ),
        ),
    ],
    indirect=True,
)


@dataclass
class Broker:
    """One vhost on a real broker, plus the management API to look inside it."""

    host: str
    amqp_port: int
    mgmt_port: int
    user: str
    password: str
    vhost: str
    local: bool  # rabbitmqctl on this machine controls this broker

    @property
    def url(self) -> str:
        return str(
            URL.build(
                scheme="amqp",
                user=self.user,
                password=self.password,
                host=self.host,
                port=self.amqp_port,
                path="/" + self.vhost,
            )
        )

    @property
    def mgmt(self) -> str:
        return f"http://{self.host}:{self.mgmt_port}/api"

    def api(self, method: str, path: str, timeout: float = 15, **kwargs: Any) -> httpx.Response:
        return httpx.request(
            method, self.mgmt + path, auth=(self.user, self.password), timeout=timeout, **kwargs
        )

    @property
    def qvhost(self) -> str:
        return quote(self.vhost, safe="")

    def queue(self, name: str) -> dict[str, Any]:
        response = self.api("GET", f"/queues/{self.qvhost}/{quote(name, safe='')}")
        response.raise_for_status()
        return response.json()

    def queue_exists(self, name: str) -> bool:
        return self.api("GET", f"/queues/{self.qvhost}/{quote(name, safe='')}").status_code == 200

    async def depth(self, name: str) -> int:
        """Ready messages right now, by passive declare (the management stats lag seconds)."""
        connection = await aio_pika.connect(self.url)
        try:
            channel = await connection.channel()
            queue = await channel.declare_queue(name, passive=True)
            return queue.declaration_result.message_count or 0
        finally:
            await connection.close()

    def get_messages(self, name: str, count: int = 100) -> list[dict[str, Any]]:
        """Peek at messages (requeued afterwards) through the management API."""
        response = self.api(
            "POST",
            f"/queues/{self.qvhost}/{quote(name, safe='')}/get",
            json={"count": count, "ackmode": "ack_requeue_true", "encoding": "auto"},
        )
        response.raise_for_status()
        return response.json()

    def publish_via_api(
        self, routing_key: str, payload: str, properties: dict[str, Any] | None = None
    ) -> bool:
        """Publish through the management API: a client that sets no message_id by itself."""
        response = self.api(
            "POST",
            f"/exchanges/{self.qvhost}/jobs/publish",
            json={
                "routing_key": routing_key,
                "payload": payload,
                "payload_encoding": "string",
                "properties": properties or {},
            },
        )
        response.raise_for_status()
        return bool(response.json()["routed"])

    def settings(self, **overrides: Any) -> WorkerSettings:
        values: dict[str, Any] = {
            "amqp_url": self.url,
            "metrics_port": 0,
            "shutdown_grace": 5,
            "publish_timeout": 10,
        }
        values.update(overrides)
        return WorkerSettings(**values)

    def close_connections(self) -> int:
        """Close every client connection to this vhost from the broker side."""
        conns = self.api("GET", f"/vhosts/{self.qvhost}/connections").json()
        for conn in conns:
            self.api(
                "DELETE",
                f"/connections/{quote(conn['name'], safe='')}",
                headers={"X-Reason": "test closes connections"},
            )
        return len(conns)


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


def _ensure_management(host: str, port: int) -> None:
    if _port_open(host, port):
        return
    if shutil.which("rabbitmq-plugins"):
        subprocess.run(
            ["rabbitmq-plugins", "enable", "rabbitmq_management"], check=False, capture_output=True
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _port_open(host, port):
            return
        time.sleep(0.5)
    raise RuntimeError(
        f"the RabbitMQ management API is not reachable on {host}:{port}; "
        f"run `rabbitmq-plugins enable rabbitmq_management`"
    )


@contextlib.contextmanager
def test_broker() -> Any:
    """Yield a ``Broker`` with a fresh vhost; delete the vhost afterwards."""
    container = None
    explicit = os.environ.get("LEVERET_TEST_AMQP_URL")
    if explicit:
        parsed = URL(explicit)
        host, port = parsed.host or "127.0.0.1", parsed.port or 5672
        user, password = parsed.user or "guest", parsed.password or "guest"
        mgmt_port = int(os.environ.get("LEVERET_TEST_MGMT_PORT", "15672"))
        local = host in ("127.0.0.1", "localhost") and shutil.which("rabbitmqctl") is not None
    elif _port_open("127.0.0.1", 5672):
        host, port, user, password, mgmt_port = "127.0.0.1", 5672, "guest", "guest", 15672
        local = shutil.which("rabbitmqctl") is not None
    else:  # pragma: no cover - only where no broker runs but Docker does
        from testcontainers.rabbitmq import RabbitMqContainer

        container = RabbitMqContainer("rabbitmq:3.13-management")
        container.with_exposed_ports(5672, 15672)
        container.start()
        host = container.get_container_host_ip()
        port = int(container.get_exposed_port(5672))
        mgmt_port = int(container.get_exposed_port(15672))
        user = password = "guest"
        local = False
    _ensure_management(host, mgmt_port)
    vhost = f"leveret-test-{uuid.uuid4().hex[:8]}"
    broker = Broker(host, port, mgmt_port, user, password, vhost, local)
    broker.api("PUT", f"/vhosts/{broker.qvhost}").raise_for_status()
    broker.api(
        "PUT",
        f"/permissions/{broker.qvhost}/{quote(user, safe='')}",
        json={"configure": ".*", "write": ".*", "read": ".*"},
    ).raise_for_status()
    try:
        yield broker
    finally:
        # A run's vhost holds hundreds of queues (29 per work queue): deleting it can take a
        # while on a busy machine, and a leftover vhost must not fail the run.
        with contextlib.suppress(httpx.HTTPError):
            broker.api("DELETE", f"/vhosts/{broker.qvhost}", timeout=180)
        if container is not None:  # pragma: no cover
            container.stop()


def delete_quorum_queues(broker: Broker) -> None:
    """Delete the run vhost's quorum queues, one at a time, after a quorum test.

    Each work queue brings 29 quorum queues (a Raft group each). Left in the run's vhost they
    pile up to hundreds, and on RabbitMQ 3.10 deleting a vhost holding that many was seen to
    hang the broker's vhost operations for good (every later vhost create timed out): the run
    would end with a broker no other run can use. Deleted here per test, a few dozen at a time,
    the vhost's own deletion at the end has no quorum queue left to stop.
    """
    with contextlib.suppress(httpx.HTTPError):
        listed = broker.api("GET", f"/queues/{broker.qvhost}?columns=name,type")
        for q in listed.json() if listed.status_code == 200 else []:
            if q.get("type") == "quorum":
                name = quote(q["name"], safe="")
                broker.api("DELETE", f"/queues/{broker.qvhost}/{name}", timeout=30)


def assert_queue_types(broker: Broker, queue: str, queue_type: str) -> None:
    """The work queue, a retry queue and the DLQ of ``queue`` exist as ``queue_type``.

    A test parametrised over queue types calls it once its worker runs, so a setting that never
    reached the declare fails the test instead of running the classic case twice.
    """
    for name in (queue, f"{queue}.dlq"):
        found = broker.queue(name)["type"]
        assert found == queue_type, f"{name} is {found}, the test runs on {queue_type}"


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@contextlib.asynccontextmanager
async def running(worker: Worker, **kwargs: Any) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``worker`` in the background until the block ends; wait until it consumes."""
    task = asyncio.create_task(worker.run(**kwargs))
    await wait_for(lambda: worker.ready or task.done(), 20, "worker to start consuming")
    if task.done():
        task.result()
    try:
        yield task
    finally:
        worker.stop()
        await asyncio.wait_for(task, worker.settings.shutdown_grace + 15)


async def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02
) -> Any:
    """Poll ``predicate`` until it is truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


def leveret_cli(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 60,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the real `leveret` console script."""
    full_env = {**os.environ, **(env or {})}
    exe = Path(sys.executable).parent / "leveret"
    return subprocess.run(
        [str(exe), *args],
        env=full_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
        check=False,
    )
