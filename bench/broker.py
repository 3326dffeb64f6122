"""The bench's own vhost on the local broker, and the few broker chores the harness does.

Uses only the standard library for the management API so the harness needs nothing beyond the
``bench`` extra. The vhost is created at the start and deleted at the end, whatever happens.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import aio_pika
from yarl import URL

from bench.wire import Wire


class BenchBroker:
    def __init__(self, amqp_url: str, mgmt_url: str) -> None:
        base = URL(amqp_url)
        self.user = base.user or "guest"
        self.password = base.password or "guest"
        self.vhost = f"leveret-bench-{uuid.uuid4().hex[:8]}"
        self.url = str(base.with_path("/" + self.vhost))
        self.mgmt = mgmt_url.rstrip("/")
        self._auth = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None

    def api(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.mgmt + "/api" + path, data=data, method=method)
        request.add_header("Authorization", "Basic " + self._auth)
        request.add_header("content-type", "application/json")
        with urllib.request.urlopen(request, timeout=15) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    @property
    def qvhost(self) -> str:
        return quote(self.vhost, safe="")

    def create(self) -> None:
        self.api("PUT", f"/vhosts/{self.qvhost}")
        self.api(
            "PUT",
            f"/permissions/{self.qvhost}/{quote(self.user, safe='')}",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )

    def delete(self) -> None:
        with contextlib.suppress(urllib.error.URLError, OSError):
            self.api("DELETE", f"/vhosts/{self.qvhost}")

    def rabbitmq_version(self) -> str:
        try:
            return str(self.api("GET", "/overview").get("rabbitmq_version", "?"))
        except (urllib.error.URLError, OSError):
            return "?"

    async def open(self) -> None:
        self._connection = await aio_pika.connect(self.url)
        self._channel = await self._connection.channel(publisher_confirms=True)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()

    @property
    def channel(self) -> aio_pika.abc.AbstractChannel:
        assert self._channel is not None
        return self._channel

    async def depth(self, queue: str) -> int:
        """Ready messages now (exact, by passive declare; the management stats lag)."""
        assert self._connection is not None
        channel = await self._connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
            return declared.declaration_result.message_count or 0
        finally:
            await channel.close()

    async def wait_depth(self, queue: str, want: int, timeout: float = 10.0) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            got = await self.depth(queue)
            if got == want or loop.time() > deadline:
                return got
            await asyncio.sleep(0.1)

    async def send(self, wire: Wire) -> None:
        exchange = (
            self.channel.default_exchange
            if not wire.exchange
            else await self.channel.get_exchange(wire.exchange, ensure=False)
        )
        props = dict(wire.props)
        if "type" in props:
            props["type"] = props.pop("type")
        await exchange.publish(
            aio_pika.Message(
                wire.body,
                headers=wire.headers,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                **props,
            ),
            routing_key=wire.routing_key,
            mandatory=True,
        )

    async def fill(self, wires: Iterator[Wire], window: int = 1000) -> None:
        """Publish with confirms, ``window`` in flight."""

        async def lane() -> None:
            for wire in wires:
                await self.send(wire)

        await asyncio.gather(*(lane() for _ in range(window)))

    def delete_queues(self, prefix: str) -> None:
        """Delete every queue of one run (the library may have made several)."""
        try:
            queues = self.api("GET", f"/queues/{self.qvhost}?columns=name")
        except (urllib.error.URLError, OSError):
            return
        for q in queues:
            if q["name"].startswith(prefix):
                with contextlib.suppress(urllib.error.URLError, OSError):
                    self.api("DELETE", f"/queues/{self.qvhost}/{quote(q['name'], safe='')}")
