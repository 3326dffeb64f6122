"""``CancelWatch``: the cancelled ids a worker must honour, kept in memory (worker-only).

The marks it loads and the broadcast it hears are written by ``request_cancel``
(``leveret.producers.stores.cancel``), which any service may call; this half runs only in a
worker, where the chain's cancellation layer (``consumer.features.cancellation``) reads the ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from aio_pika import ExchangeType
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from leveret.producers.stores import (
    DEFAULT_MAX_IDS,
    CancelMarks,
    StatusStoreUnavailable,
    cancel_exchange,
)

log = structlog.get_logger("leveret.cancel")


class CancelWatch:
    """The cancelled ids a worker must honour, kept in memory; ``start()``/``stop()``.

    ``job_id in watch`` is the hot-path check (one dict lookup). ``on_cancel(job_id)`` is called
    for each id that arrives by broadcast while running, so the worker can cancel a running
    ``cancellable=True`` job (it is not called for the marks loaded at start: nothing of ours
    runs yet). The connection belongs to the caller; the watch opens its own channel and, on a
    robust connection, reloads the marks after each reconnect (a broadcast sent while we were
    disconnected reached no queue of ours).
    """

    def __init__(
        self,
        connection: AbstractConnection,
        marks: CancelMarks,
        *,
        exchange: str = "jobs",
        ttl: float | None = None,
        max_ids: int = DEFAULT_MAX_IDS,
        on_cancel: Callable[[str], None] | None = None,
        ids: OrderedDict[str, float] | None = None,
    ) -> None:
        """``ids``: the mapping to keep the cancelled ids in (the worker's chain layer reads
        it; it outlives this watch across reconnects), else a new one."""
        self.connection = connection
        self.marks = marks
        self.exchange = exchange
        self.ttl = float(ttl if ttl is not None else marks.ttl)
        self.max_ids = max_ids
        self.on_cancel = on_cancel
        # id -> monotonic time added; insertion order is age order (one TTL for all).
        self._ids: OrderedDict[str, float] = ids if ids is not None else OrderedDict()
        self.dropped = 0  # ids dropped to stay under max_ids (each is logged)
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._reload_task: asyncio.Task[None] | None = None

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._ids

    @property
    def ids(self) -> Mapping[str, float]:
        """The live id → added-at mapping. The worker binds it once and checks
        ``job_id in ids`` per delivery: a dict lookup, without the method call of ``in watch``."""
        return self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, job_id: str, *, notify: bool = False) -> None:
        """Record a cancelled id; ``notify`` calls ``on_cancel`` (a broadcast, not a reload)."""
        now = time.monotonic()
        ids = self._ids
        if job_id not in ids:
            ids[job_id] = now
            horizon = now - self.ttl
            while ids:
                oldest, added = next(iter(ids.items()))
                if added > horizon and len(ids) <= self.max_ids:
                    break
                ids.popitem(last=False)
                if added > horizon:
                    self.dropped += 1
                    log.warning(
                        "cancel.watch_full",
                        dropped=oldest,
                        max_ids=self.max_ids,
                        effect="that job may run if it is still queued",
                    )
        if notify and self.on_cancel is not None:
            try:
                self.on_cancel(job_id)
            except Exception as exc:  # a hook's bug must not stop the watch
                log.error("cancel.hook_failed", job_id=job_id, error=f"{type(exc).__name__}: {exc}")

    async def start(self) -> None:
        """Subscribe first, then load the marks: a cancel between the two is seen at least
        once (by the queue, the scan, or both; adding an id twice changes nothing)."""
        channel = await self.connection.channel()
        exchange = await channel.declare_exchange(
            cancel_exchange(self.exchange), ExchangeType.FANOUT, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange)
        await queue.consume(self._on_message, no_ack=True)
        self._channel, self._queue = channel, queue
        try:
            await self.reload()
        except StatusStoreUnavailable as exc:
            # Redis down must not keep the worker from consuming (jobs run without a status
            # store too); broadcasts are heard meanwhile and the marks load once it is back.
            log.warning(
                "cancel.marks_not_loaded",
                error=str(exc),
                action="consuming; retrying the load in the background",
            )
            self._reload_task = asyncio.create_task(self._reload_until_loaded())
        reconnected = getattr(self.connection, "reconnect_callbacks", None)
        if reconnected is not None:
            reconnected.add(self._on_reconnect)
        log.info("cancel.watch_started", pending=len(self._ids))

    async def reload(self) -> int:
        """Add every marked id; returns how many marks were read."""
        count = 0
        async for job_id in self.marks.pending():
            self.add(job_id)
            count += 1
        return count

    async def _reload_until_loaded(self, delay: float = 0.5, max_delay: float = 30.0) -> None:
        """Load the marks once the store is back: first after ``delay`` (the load at start just
        failed), then after each failure twice as long, up to ``max_delay``."""

        def log_failure(retry: RetryCallState) -> None:
            exc = retry.outcome.exception() if retry.outcome is not None else None
            log.warning(
                "cancel.reload_failed",
                error=str(exc),
                attempt=retry.attempt_number,
                retry_in=round(retry.upcoming_sleep, 2),
            )

        await asyncio.sleep(delay)
        retrying = AsyncRetrying(
            wait=wait_exponential(multiplier=2 * delay, max=max_delay),
            retry=retry_if_exception_type(StatusStoreUnavailable),
            before_sleep=log_failure,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                count = await self.reload()
        log.info("cancel.reloaded", marks=count)

    def _on_reconnect(self, *_: Any) -> None:
        if self._reload_task is None or self._reload_task.done():
            self._reload_task = asyncio.create_task(self._reload_logged())

    async def _reload_logged(self) -> None:
        try:
            count = await self.reload()
        except StatusStoreUnavailable as exc:
            log.warning("cancel.reload_failed", error=str(exc))
        else:
            log.info("cancel.reloaded", marks=count)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        job_id = message.body.decode("utf-8", "replace")
        if job_id:
            self.add(job_id, notify=True)

    async def stop(self) -> None:
        reconnected = getattr(self.connection, "reconnect_callbacks", None)
        if reconnected is not None:
            with contextlib.suppress(Exception):
                reconnected.discard(self._on_reconnect)
        if self._reload_task is not None:
            self._reload_task.cancel()
            await asyncio.gather(self._reload_task, return_exceptions=True)
        if self._channel is not None and not self._channel.is_closed:
            with contextlib.suppress(Exception):
                await self._channel.close()
        self._channel = self._queue = None
