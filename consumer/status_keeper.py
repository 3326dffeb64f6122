"""The status keeper: applies lifecycle events to the status store, from a durable queue.

Why a queue and not a write on the job's path: the worker only publishes events (confirmed, for
outcomes), so a slow or dead Redis never delays or fails a job; the events wait in
``<exchange>.events.status`` (durable, bound to ``<exchange>.events`` with ``#``) until a keeper
has written them. A message is acked only after its write succeeded, so no process can die with
a state change that exists nowhere else.

Several keepers (one per worker process) may consume the same queue: the store's ordering rule
makes every write commutative enough that duplicates and reorderings never move a status back.

Redis down: the failing message is held (not acked, not requeued, so it keeps its place and the
broker never loops it back at us), the consumer's prefetch stops further deliveries, and one
probe task pings the store with exponential backoff, logging one line per failed attempt with a
count. When the store answers, every held message is retried. Nothing spins.

A malformed event is logged and acked, not dead-lettered: it cannot become valid by waiting,
requeueing would loop it forever, and the events stream has no operator-facing DLQ (a parking
queue no one reads would only grow). The log line carries the reason and the start of the body.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import structlog
from aio_pika import ExchangeType
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from aiormq.abc import FieldTable

from leveret.producers.events import TERMINAL_STATES, InvalidEvent, events_exchange, parse_event
from leveret.producers.status import StatusStore, StatusStoreUnavailable

log = structlog.get_logger("leveret.status_keeper")


def status_queue_name(exchange: str) -> str:
    """``jobs`` → ``jobs.events.status``: next to the exchange it drains in the management UI."""
    return f"{events_exchange(exchange)}.status"


class StatusKeeper:
    """Consume ``<exchange>.events.status`` into a ``StatusStore``; ``start()``/``stop()``.

    The connection belongs to the caller (a robust one re-consumes by itself after a reconnect);
    the keeper opens and closes its own channel on it.
    """

    def __init__(
        self,
        connection: AbstractConnection,
        store: StatusStore,
        *,
        exchange: str = "jobs",
        queue: str | None = None,
        prefetch: int = 64,
        queue_type: Literal["classic", "quorum"] = "classic",
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        release: Callable[[str], Awaitable[object]] | None = None,
    ) -> None:
        """``release(job_id)`` (``DedupStore.release_job``) runs after an ending event
        (``succeeded``, ``dead``, ``cancelled``) is applied, before its ack: a job's
        ``dedup_key`` is free once its status says it ended, and a keeper dying in between
        leaves the event unacked, so the next keeper frees it (a release is idempotent)."""
        self.connection = connection
        self.release = release
        self.store = store
        self.exchange = events_exchange(exchange)
        self.queue_name = queue or status_queue_name(exchange)
        self.prefetch = prefetch
        self.queue_type = queue_type
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        # Counters, for logs, metrics and tests.
        self.applied = 0  # events that changed a status
        self.ignored = 0  # events the ordering rule discarded (late, duplicate)
        self.rejected = 0  # malformed events or permanent store errors: logged and acked
        self.failures = 0  # failed store calls in the current outage (0 when healthy)

        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._store_ok = asyncio.Event()
        self._store_ok.set()
        self._delay = backoff_initial
        self._prober: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def healthy(self) -> bool:
        """False while the store is unreachable and events are being held."""
        return self._store_ok.is_set()

    async def start(self) -> None:
        """Declare the exchange, the durable queue and its binding, then start consuming."""
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=self.prefetch)
        exchange = await channel.declare_exchange(self.exchange, ExchangeType.TOPIC, durable=True)
        arguments: FieldTable | None = (
            {"x-queue-type": "quorum"} if self.queue_type == "quorum" else None
        )
        queue = await channel.declare_queue(self.queue_name, durable=True, arguments=arguments)
        await queue.bind(exchange, "#")
        self._channel, self._queue = channel, queue
        self._consumer_tag = await queue.consume(self._on_message)
        log.info("status_keeper.started", queue=self.queue_name, prefetch=self.prefetch)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop consuming, let in-progress writes finish for up to ``grace`` s, close the channel.

        Messages still held (store down) are left unacked; closing the channel returns them to
        the queue for the next keeper.
        """
        if self._queue is not None and self._consumer_tag is not None:
            with contextlib.suppress(Exception):
                await self._queue.cancel(self._consumer_tag)
        self._consumer_tag = None
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
            self._prober = None
        if self._channel is not None and not self._channel.is_closed:
            with contextlib.suppress(Exception):
                await self._channel.close()
        self._channel = self._queue = None
        log.info("status_keeper.stopped", queue=self.queue_name)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._handle(message)
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            event = parse_event(message.body)
        except InvalidEvent as exc:
            self.rejected += 1
            log.error(
                "status_keeper.bad_event",
                error=str(exc),
                routing_key=message.routing_key,
                body=message.body[:200].decode("utf-8", "replace"),
                rejected=self.rejected,
            )
            await self._ack(message)
            return
        while True:
            await self._store_ok.wait()
            try:
                changed = await self.store.apply(event)
                if self.release is not None and event.state in TERMINAL_STATES:
                    await self.release(event.job_id)
            except StatusStoreUnavailable as exc:
                self._enter_outage(exc)
                continue
            except Exception as exc:
                # A permanent refusal (e.g. WRONGTYPE under our prefix) or a bug: retrying
                # cannot help, and holding the message would stall the queue behind it.
                self.rejected += 1
                log.error(
                    "status_keeper.write_refused",
                    job_id=event.job_id,
                    state=event.state,
                    error=f"{type(exc).__name__}: {exc}",
                    rejected=self.rejected,
                )
                await self._ack(message)
                return
            break
        self._delay = self.backoff_initial
        if changed:
            self.applied += 1
        else:
            self.ignored += 1
        await self._ack(message)

    async def _ack(self, message: AbstractIncomingMessage) -> None:
        try:
            await message.ack()
        except Exception as exc:
            # The channel went away (reconnect): the broker redelivers the event and applying
            # it again changes nothing.
            log.warning("status_keeper.ack_failed", error=f"{type(exc).__name__}: {exc}")

    def _enter_outage(self, exc: BaseException) -> None:
        """First failure of an outage: hold every delivery and let one task probe the store."""
        if not self._store_ok.is_set():
            return  # a probe is already running; this failure is the same outage
        self._store_ok.clear()
        self.failures += 1
        log.warning(
            "status_keeper.store_unavailable",
            error=str(exc),
            failures=self.failures,
            retry_in=round(self._delay, 2),
        )
        self._prober = asyncio.create_task(self._probe(), name="leveret-status-probe")

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(self._delay)
            self._delay = min(self._delay * 2, self.backoff_max)
            try:
                await self.store.ping()
            except StatusStoreUnavailable as exc:
                self.failures += 1
                log.warning(
                    "status_keeper.store_unavailable",
                    error=str(exc),
                    failures=self.failures,
                    retry_in=round(self._delay, 2),
                )
                continue
            log.info("status_keeper.store_back", failures=self.failures)
            self.failures = 0
            self._prober = None
            self._store_ok.set()
            return
