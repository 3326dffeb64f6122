"""``/metrics``, ``/healthz`` and ``/readyz`` on one small asyncio HTTP server.

It runs on the worker's own event loop on purpose: if the loop is stuck, ``/healthz`` stops
answering and the orchestrator restarts the worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from leveret.consumer.runtime.metrics import WorkerMetrics

log = structlog.get_logger("leveret.health")


class HealthServer:
    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, is_ready: Callable[[], bool]
    ) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self.is_ready = is_ready
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        sockets: tuple[Any, ...] = tuple(self._server.sockets or ())
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info(
            "http_listening",
            host=self.host,
            port=self.port,
            paths=["/metrics", "/healthz", "/readyz"],
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _node(self) -> str | None:
        """The broker node a worker on this registry consumes from (masked), if it is one."""
        metrics = WorkerMetrics.built_on(self.registry)
        return metrics.node if metrics is not None else None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            if path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.registry)
            elif path == "/healthz":
                status, ctype, body = "200 OK", "text/plain", b"ok\n"
            elif path == "/readyz":
                ready = self.is_ready()
                status = "200 OK" if ready else "503 Service Unavailable"
                ctype, body = "text/plain", b"ready\n" if ready else b"not ready\n"
                node = self._node()
                if ready and node:
                    body = f"ready\nnode {node}\n".encode()
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
