"""The history writer, ``leveret history APP``: outcome events into ``leveret_jobs``, in batches.

It declares a durable queue ``<exchange>.history`` bound to ``<exchange>.events`` for the
outcome routing keys (``*.succeeded``, ``*.retrying``, ``*.dead``, ``*.cancelled``) and
``*.started`` (published with ``LEVERET_EVENTS=all``), consumes it with a prefetch, and writes
what arrived as one upsert every ``batch_size`` events or ``flush_interval`` seconds, whichever
comes first. A batch is acknowledged (one ``basic.ack`` with ``multiple`` on its last tag) only
after its transaction committed, so nothing is lost to a crash of the writer, of PostgreSQL or
of the network between them: unacknowledged events go back to the queue and are written again
(the upsert is idempotent: a job is one row whatever it is sent twice).

- PostgreSQL unreachable: the batch is held and retried with backoff (tenacity); no ack, so
  events wait in the broker (the prefetch bounds what this process holds).
- The broker connection lost: the unacknowledged batch is dropped here (the broker redelivers
  it) and the writer reconnects with backoff.
- A malformed event: logged and acknowledged with its batch (never a crash loop); a row
  PostgreSQL refuses (not a connection problem) is logged and skipped the same way.
- SIGTERM: stops consuming, writes and acknowledges what it holds, exits 0 (a PostgreSQL still
  down after ``stop_grace`` seconds: it leaves the batch unacknowledged, in the broker).
- Retention: rows older than ``LEVERET_HISTORY_DAYS`` are deleted at start and then hourly.

Several replicas may consume the same queue: rows are merged by the upsert's ordering rule
(store.py), not by the order the events arrive in.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential_jitter,
)

from leveret.consumer.history.queue import declare_history_queue, history_queue
from leveret.consumer.history.store import HistoryStore, HistoryUnavailable, transient
from leveret.producers.broker import connect
from leveret.producers.wire import (
    InvalidEvent,
    JobEvent,
    parse_event,
)

if TYPE_CHECKING:
    from aiormq.abc import AbstractChannel, DeliveredMessage

    from leveret.producers import ConnectionSettings

log = structlog.get_logger("leveret.history")

DEFAULT_PREFETCH: Final = 4000  # two batches in flight and the next one filling
DEFAULT_BATCH: Final = 1000
DEFAULT_FLUSH_S: Final = 0.2
RETENTION_INTERVAL_S: Final = 3600.0


def _parse(body: bytes) -> JobEvent:
    """``parse_event``'s result, by pydantic's own JSON parser (several times faster than
    ``json.loads`` then validation); ``parse_event`` again for the readable reason of a defect."""
    try:
        return JobEvent.model_validate_json(body)
    except ValueError:  # pydantic's ValidationError is one
        return parse_event(body)  # raises InvalidEvent (or accepts what it accepts)


class SchemaBehind(HistoryUnavailable):
    """The database lacks migrations this release needs."""


@dataclass
class WriterStats:
    events: int = 0
    rows: int = 0
    batches: int = 0
    malformed: int = 0
    rejected: int = 0
    retention_deleted: int = 0


class HistoryWriter:
    """One writer process's consumer; ``run()`` until ``stop()``."""

    def __init__(
        self,
        settings: ConnectionSettings,
        store: HistoryStore,
        *,
        days: int = 30,
        prefetch: int = DEFAULT_PREFETCH,
        batch_size: int = DEFAULT_BATCH,
        flush_interval: float = DEFAULT_FLUSH_S,
        retention_interval: float = RETENTION_INTERVAL_S,
        stop_grace: float = 30.0,
        pipeline: int = 2,
        queue_arguments: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.days = days
        self.prefetch = prefetch
        self.batch_size = min(batch_size, prefetch)
        self.flush_interval = flush_interval
        self.retention_interval = retention_interval
        self.stop_grace = stop_grace
        self.pipeline = max(1, pipeline)
        self.queue = history_queue(settings.exchange)
        self.queue_arguments = queue_arguments or {}
        self.stats = WriterStats()
        self.consuming = False
        self._stopping = asyncio.Event()
        self._buffer: list[DeliveredMessage] = []
        self._wake = asyncio.Event()
        self._schema_checked = False
        self._stop_deadline = float("inf")

    def stop(self) -> None:
        if not self._stopping.is_set():
            self._stop_deadline = time.monotonic() + self.stop_grace
        self._stopping.set()
        self._wake.set()

    def _keep_trying(self) -> bool:
        """Retries go on until stopped, then for ``stop_grace`` seconds more."""
        return time.monotonic() < self._stop_deadline

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    # --- the loop ---

    async def run(self) -> None:
        retention = asyncio.create_task(self._retention_loop(), name="leveret-history-retention")
        failures = 0

        def log_failure(retry: RetryCallState) -> None:
            nonlocal failures
            failures += 1
            exc = retry.outcome.exception() if retry.outcome is not None else None
            log.warning(
                "history.broker_unavailable",
                error=f"{type(exc).__name__}: {exc}",
                failures=failures,
                retry_in=round(retry.upcoming_sleep, 2),
            )

        try:
            retrying = AsyncRetrying(
                wait=wait_exponential_jitter(multiplier=0.5, max=30),
                retry=retry_if_exception(
                    lambda e: not isinstance(e, SchemaBehind) and not self._stopping.is_set()
                ),
                before_sleep=log_failure,
                sleep=self._sleep_unless_stopped,
                reraise=True,
            )
            async for attempt in retrying:
                with attempt:
                    await self._session()
        except Exception as exc:
            if not self._stopping.is_set() or isinstance(exc, SchemaBehind):
                raise
            # Stopped while the broker or PostgreSQL was away: what this process held was
            # not acknowledged and waits in the broker.
            log.warning("history.stopped_unwritten", error=f"{type(exc).__name__}: {exc}")
        finally:
            retention.cancel()
            await asyncio.gather(retention, return_exceptions=True)
            log.info("history.stopped", **vars(self.stats))

    async def _session(self) -> None:
        """One broker connection: declare, consume, flush batches until stopped or it drops."""
        if self._stopping.is_set():
            return
        connection = await connect(self.settings, robust=False)
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=self.prefetch)
            quorum = self.queue_arguments.get("x-queue-type") == "quorum"
            await declare_history_queue(
                channel, self.settings.exchange, "quorum" if quorum else "classic"
            )
            await self._check_schema()
            raw = await channel.get_underlay_channel()
            self._buffer = []
            ok = await raw.basic_consume(self.queue, self._on_message, no_ack=False)
            self.consuming = True
            log.info("history.consuming", queue=self.queue, prefetch=self.prefetch)
            try:
                await self._pump(raw)
            finally:
                self.consuming = False
            if ok.consumer_tag and not raw.is_closed:
                with contextlib.suppress(Exception):
                    await raw.basic_cancel(ok.consumer_tag)
            # What arrived before the cancel took effect: written too, so a stop leaves
            # nothing held (what was not written goes back to the queue on close).
            await self._drain(raw)
        finally:
            self._buffer = []
            with contextlib.suppress(Exception):
                await connection.close()

    async def _on_message(self, message: DeliveredMessage) -> None:
        self._buffer.append(message)
        # the first event starts a batch's flush_interval; a full batch is written at once
        if len(self._buffer) == 1 or len(self._buffer) >= self.batch_size:
            self._wake.set()

    async def _pump(self, raw: AbstractChannel) -> None:
        """Take batches off the buffer and write them, up to ``pipeline`` at once; acknowledge
        each, in order, once it and every batch before it committed (a ``multiple`` ack of a
        batch's last tag then covers exactly that batch)."""
        closing = raw.closing
        inflight: deque[asyncio.Task[int]] = deque()
        try:
            while not self._stopping.is_set():
                if not self._buffer:
                    self._wake.clear()  # no await since the loop's stop check: none is lost
                    waiter = asyncio.ensure_future(self._wake.wait())
                    waits: set[asyncio.Future[Any]] = {waiter, closing}
                    if inflight:
                        waits.add(inflight[0])
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                if closing.done():
                    raise ConnectionError("the broker closed the channel")
                await self._ack_done(raw, inflight, block=False)
                if self._stopping.is_set() or not self._buffer:
                    continue
                if len(self._buffer) < self.batch_size and not inflight:
                    # give the batch until flush_interval to fill, unless it fills first
                    with contextlib.suppress(TimeoutError):
                        self._wake.clear()
                        await asyncio.wait_for(self._wake.wait(), self.flush_interval)
                self._wake.clear()
                if len(inflight) >= self.pipeline:
                    await self._ack_done(raw, inflight, block=True)
                inflight.append(asyncio.ensure_future(self._write_batch(self._take())))
            while inflight:  # stopping: what is in flight finishes and is acknowledged
                await self._ack_done(raw, inflight, block=True)
        finally:
            for task in inflight:
                task.cancel()
            await asyncio.gather(*inflight, return_exceptions=True)

    def _take(self) -> list[DeliveredMessage]:
        batch, self._buffer = self._buffer[: self.batch_size], self._buffer[self.batch_size :]
        if self._buffer:
            self._wake.set()
        return batch

    async def _ack_done(
        self, raw: AbstractChannel, inflight: deque[asyncio.Task[int]], *, block: bool
    ) -> None:
        """Acknowledge the finished batches at the head of ``inflight`` (waiting for the head
        first with ``block``); a failed write raises here."""
        if block and inflight:
            await asyncio.wait({inflight[0], raw.closing}, return_when=asyncio.FIRST_COMPLETED)
            if not inflight[0].done():
                raise ConnectionError("the broker closed the channel")
        while inflight and inflight[0].done():
            tag = inflight.popleft().result()
            await raw.basic_ack(tag, multiple=True)

    async def _drain(self, raw: AbstractChannel) -> None:
        while self._buffer and not raw.is_closed:
            tag = await self._write_batch(self._take())
            await raw.basic_ack(tag, multiple=True)

    async def _write_batch(self, batch: list[DeliveredMessage]) -> int:
        """Parse and write one batch (retrying while PostgreSQL is away); its last tag."""
        started = time.perf_counter()
        events: list[JobEvent] = []
        for message in batch:
            try:
                events.append(_parse(message.body))
            except InvalidEvent as exc:
                self.stats.malformed += 1
                log.warning(
                    "history.malformed_event",
                    error=str(exc),
                    routing_key=message.routing_key,
                    action="acknowledged and skipped",
                )
        rows = await self._write_retrying(events)
        self.stats.events += len(batch)
        self.stats.rows += rows
        self.stats.batches += 1
        log.debug(
            "history.batch",
            events=len(batch),
            rows=rows,
            seconds=round(time.perf_counter() - started, 4),
        )
        tag = batch[-1].delivery_tag
        assert tag is not None
        return tag

    async def _write_retrying(self, events: Sequence[JobEvent]) -> int:
        failures = 0

        def log_failure(retry: RetryCallState) -> None:
            nonlocal failures
            failures += 1
            exc = retry.outcome.exception() if retry.outcome is not None else None
            log.warning(
                "history.database_unavailable",
                where=self.store.where,
                error=f"{type(exc).__name__}: {exc}",
                failures=failures,
                held=len(events),
                retry_in=round(retry.upcoming_sleep, 2),
            )

        retrying = AsyncRetrying(
            wait=wait_exponential_jitter(multiplier=0.2, max=10),
            retry=retry_if_exception(lambda e: transient(e) and self._keep_trying()),
            before_sleep=log_failure,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                written = await self._write(events)
        if failures:
            log.info("history.database_back", failures=failures)
        return written

    async def _write(self, events: Sequence[JobEvent]) -> int:
        """The batch as one upsert; a batch PostgreSQL refuses for its data is split until the
        refused events are found, logged and skipped."""
        try:
            return await self.store.upsert(events)
        except Exception as exc:
            if transient(exc):
                raise
            if len(events) > 1:
                half = len(events) // 2
                return await self._write(events[:half]) + await self._write(events[half:])
            self.stats.rejected += len(events)
            log.error(
                "history.event_rejected",
                job_id=events[0].job_id if events else None,
                error=f"{type(exc).__name__}: {exc}",
                action="acknowledged and skipped",
            )
            return 0

    async def _check_schema(self) -> None:
        if self._schema_checked:
            return
        retrying = AsyncRetrying(
            wait=wait_exponential_jitter(multiplier=0.5, max=10),
            retry=retry_if_exception(lambda e: transient(e) and self._keep_trying()),
            before_sleep=lambda r: log.warning(
                "history.database_unavailable",
                where=self.store.where,
                error=repr(r.outcome.exception()) if r.outcome else None,
            ),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                pending = await self.store.pending_migrations()
        if pending:
            raise SchemaBehind(
                f"the history schema in {self.store.where} lacks migration(s) "
                f"{', '.join(map(str, pending))}: run `leveret history migrate`"
            )
        self._schema_checked = True

    async def _retention_loop(self) -> None:
        while True:
            try:
                deleted = await self.store.delete_older_than(self.days)
                self.stats.retention_deleted += deleted
                log.info("history.retention", deleted=deleted, days=self.days)
            except Exception as exc:  # next time; the writer keeps writing
                log.warning("history.retention_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(self.retention_interval)
