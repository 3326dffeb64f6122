"""Keep ``leveret_dlq_messages{queue}`` current, cheaply.

Every ``interval_s`` (15 s by default, a Prometheus scrape interval) the refresher counts the
messages in each consumed queue's ``Q.dlq`` by a passive ``queue.declare``: one small frame per
queue on a channel of its own, so it never touches the consuming or publishing channels and a
missing DLQ (which makes the broker close the channel) costs only that channel. It works on
whatever connection the worker's current session has (``attach``) and pauses while there is
none. Every worker of a fleet reports the same figure; aggregate with ``max by (queue)``.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection
from prometheus_client import Gauge

from leveret.producers.broker import CONNECTION_ERRORS
from leveret.topology.declare import queue_depth
from leveret.topology.model import dlq_name

DEFAULT_INTERVAL_S = 15.0

# What ends one refresh (the next opens a channel again), never the refresher.
_REFRESH_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, aiormq.exceptions.AMQPError)

log = structlog.get_logger("leveret.worker")


class DlqDepthRefresher:
    """Sets ``gauge.labels(queue=Q)`` to the depth of ``Q.dlq`` for each queue, periodically."""

    def __init__(
        self, queues: list[str], gauge: Gauge, interval_s: float = DEFAULT_INTERVAL_S
    ) -> None:
        self.queues = list(queues)
        self.gauge = gauge
        self.interval_s = interval_s
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def attach(self, connection: AbstractConnection) -> None:
        """Use this (new) connection and refresh now rather than at the next tick."""
        self._connection = connection
        self._channel = None
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="leveret-dlq-depth")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def refresh(self) -> None:
        """Passive-declare every DLQ once; skip quietly when not connected."""
        connection = self._connection
        if connection is None or connection.is_closed:
            return
        for queue in self.queues:
            if self._channel is None or self._channel.is_closed:
                self._channel = await connection.channel(publisher_confirms=False)
            raw = await self._channel.get_underlay_channel()
            depth = await queue_depth(raw, dlq_name(queue))
            if depth is None:
                self._channel = None  # the broker closed it; the DLQ does not exist (yet)
                continue
            self.gauge.labels(queue=queue).set(depth)

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except _REFRESH_ERRORS as exc:
                self._channel = None
                log.debug("dlq_depth_refresh_failed", error=f"{type(exc).__name__}: {exc}")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
