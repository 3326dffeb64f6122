"""Operating a dead-letter queue: list, replay and purge ``Q.dlq``, losing nothing.

Reading a queue without changing it
===================================

AMQP 0-9-1 has no "peek": the only way to see a message is to have it delivered. Listing
therefore consumes ``Q.dlq`` with manual acks and **never acks**: it takes the messages in
pages, reads them, then cancels the consumer and nacks everything with ``requeue=True`` in one
frame. A page is one consumer with a per-consumer prefetch of one page: once it has its page it
is cancelled (its messages stay unacked on the channel) and the next page's consumer starts, so
a 4,000-message DLQ is never pushed at the client all at once. Channel-wide (``global``) QoS is
never used: quorum queues refuse a consumer on such a channel, and RabbitMQ 4.3 refuses it for
every queue type.

* Nothing is lost: an unacked message cannot leave the queue; if the lister dies, the broker
  requeues what it held, exactly as the final nack does.
* Order is kept: a classic queue puts requeued messages back at their original position, so the
  DLQ reads in the same order afterwards (the tests compare ids, order, headers and bodies).
* What does change: the broker sets ``redelivered`` on requeued messages (and a quorum DLQ
  counts an ``x-delivery-count``). Nothing Leveret does depends on that flag *in the DLQ*: a
  replay publishes a fresh copy to ``Q``, whose ``redelivered`` is false and whose headers drop
  ``x-delivery-count`` along with the attempt bookkeeping, so a listed job replays exactly like
  an unlisted one.

The alternatives were worse: ``basic.get`` plus ``nack`` one at a time costs a round trip per
message and has the same ``redelivered`` side effect; moving messages to a copy queue and back
rewrites the DLQ and can lose messages to a crash in between.

Replay: confirm first, then ack
===============================

A replayed job is published to ``Q`` through the default exchange with publisher confirms and
``mandatory``; only once the broker confirmed it is the DLQ copy acked. A crash (even SIGKILL)
between the two leaves the job in both queues (a duplicate at worst), never in neither.
Messages that do not match the filters are held unacked during the scan and requeued at the end,
in place.

A scan stops after the messages that were in the DLQ when it started: jobs that die again while
a replay runs land at the tail and are not replayed a second time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from pamqp.commands import Basic

from leveret.producers import ConnectionSettings
from leveret.producers.broker import CONNECTION_ERRORS, connect, publish_confirmed
from leveret.producers.stores import HEADER_DEDUP_KEY, LifecycleSettings, StatusStore, status_write
from leveret.producers.wire import (
    HEADER_ATTEMPTS,
    HEADER_DIED_AT,
    HEADER_ERROR,
    HEADER_QUEUE,
    HEADER_REASON,
    carried_headers,
    copy_properties,
)
from leveret.topology.declare import queue_depth
from leveret.topology.errors import InvalidValueError, LeveretError
from leveret.topology.model import dlq_name

PAGE_SIZE = 500
# basic.qos prefetch_count is a 16-bit field: a page is at most that many messages.
_MAX_PREFETCH = 65535
IDLE_TIMEOUT_S = 5.0
REPLAY_IN_FLIGHT = 200


class DlqError(LeveretError):
    """A DLQ operation cannot run (no such queue, refused publish, ...)."""


class InvalidDurationError(InvalidValueError):
    """A duration (``--older-than``) that is not a number with an optional unit."""

    def __init__(self, text: str) -> None:
        self.text = text
        super().__init__(
            f"duration {text!r} is not valid: use a number with an optional unit "
            f"ms, s, m, h, d or w (e.g. 30m, 2h, 7d)"
        )


@dataclass(frozen=True, slots=True)
class DeadJob:
    """One message in ``Q.dlq``, as the operator sees it."""

    id: str | None
    job: str | None
    attempts: int | None
    reason: str | None
    error: str | None
    died_at: str | None
    queue: str | None
    body: bytes
    headers: dict[str, Any]
    redelivered: bool = False

    @classmethod
    def from_message(cls, message: aiormq.abc.DeliveredMessage) -> DeadJob:
        props = message.header.properties
        headers = dict(props.headers or {})
        attempts = headers.get(HEADER_ATTEMPTS)
        delivery = message.delivery  # a consumer's Deliver or a GetOk; both say redelivered
        return cls(
            id=props.message_id,
            job=props.message_type,
            attempts=attempts
            if isinstance(attempts, int) and not isinstance(attempts, bool)
            else None,
            reason=_text(headers.get(HEADER_REASON)),
            error=_text(headers.get(HEADER_ERROR)),
            died_at=_text(headers.get(HEADER_DIED_AT)),
            queue=_text(headers.get(HEADER_QUEUE)),
            body=bytes(message.body),
            headers=headers,
            redelivered=isinstance(delivery, Basic.Deliver | Basic.GetOk)
            and bool(delivery.redelivered),
        )

    def died_at_datetime(self) -> datetime | None:
        if not self.died_at:
            return None
        try:
            value = datetime.fromisoformat(self.died_at)
        except ValueError:
            return None
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    def row(self) -> dict[str, Any]:
        """The listing's columns, JSON-ready."""
        return {
            "id": self.id,
            "job": self.job,
            "attempts": self.attempts,
            "reason": self.reason,
            "error": self.error,
            "died_at": self.died_at,
        }


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$", re.IGNORECASE)
_UNITS_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``7d``, ``1w`` → seconds."""
    match = _DURATION.match(text)
    if not match:
        raise InvalidDurationError(text)
    unit = match[2].lower() if match[2] else None
    return float(match[1]) * _UNITS_S[unit]


@dataclass(frozen=True)
class Filter:
    """Which dead jobs an operation applies to; every given criterion must hold."""

    ids: frozenset[str] = frozenset()
    job: str | None = None
    reason: str | None = None
    older_than_s: float | None = None
    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    @property
    def empty(self) -> bool:
        return (
            not self.ids
            and self.job is None
            and self.reason is None
            and (self.older_than_s is None)
        )

    def matches(self, dead: DeadJob) -> bool:
        if self.ids and dead.id not in self.ids:
            return False
        if self.job is not None and dead.job != self.job:
            return False
        if self.reason is not None and dead.reason != self.reason:
            return False
        if self.older_than_s is not None:
            died = dead.died_at_datetime()
            # A message with no readable death time is never "old enough": purge keeps it.
            if died is None or (self.now - died).total_seconds() < self.older_than_s:
                return False
        return True

    def describe(self) -> str:
        parts = []
        if self.ids:
            parts.append(f"id in {sorted(self.ids)}")
        if self.job is not None:
            parts.append(f"job = {self.job}")
        if self.reason is not None:
            parts.append(f"reason = {self.reason}")
        if self.older_than_s is not None:
            parts.append(f"died more than {self.older_than_s:g} s ago")
        return " and ".join(parts) or "all"


@dataclass
class _Delivery:
    tag: int
    dead: DeadJob
    message: aiormq.abc.DeliveredMessage


class _Scan:
    """Consume ``Q.dlq`` in pages with manual acks; whatever is not acked is requeued at close."""

    def __init__(self, channel: aiormq.abc.AbstractChannel, dlq: str, total: int) -> None:
        self.channel = channel
        self.dlq = dlq
        self.total = total
        self.received = 0
        self._inbox: asyncio.Queue[aiormq.abc.DeliveredMessage] = asyncio.Queue()
        self._tag: str | None = None
        self._window = 0
        # The highest delivery tag each page's consumer got, in the order the pages started.
        self._page_last: dict[str, int] = {}
        self._settled: set[int] = set()

    async def _consume_page(self, size: int) -> None:
        """Start a consumer that receives at most ``size`` more messages.

        Per-consumer prefetch applies only to consumers started after the ``basic.qos``, so
        each page is a fresh consumer; the previous one is cancelled first. Its messages stay
        unacked on the channel (cancelling requeues nothing), so they neither count against the
        new consumer's window nor return to the queue before ``close``.
        """
        if self._tag is not None:
            await self.channel.basic_cancel(self._tag)
            self._tag = None
        size = min(size, _MAX_PREFETCH)
        self._window += size
        await self.channel.basic_qos(prefetch_count=size, global_=False)
        ok = await self.channel.basic_consume(self.dlq, self._inbox.put, no_ack=False)
        self._tag = ok.consumer_tag
        self._page_last[ok.consumer_tag or ""] = 0

    async def start(self, page: int) -> None:
        await self._consume_page(max(1, min(page, self.total)))

    async def deliveries(
        self, page: int, idle_timeout_s: float, on_page: Callable[[int], None] | None = None
    ) -> AsyncIterator[_Delivery]:
        """The first ``total`` messages of the DLQ, paged; stops early when it runs dry."""
        while self.received < self.total:
            if self.received >= self._window:
                await self._consume_page(min(page, self.total - self._window))
                if on_page is not None:
                    on_page(self.received)
            try:
                message = await asyncio.wait_for(self._inbox.get(), idle_timeout_s)
            except TimeoutError:
                return  # fewer than counted: consumed by someone else meanwhile
            self.received += 1
            tag = self._note(message)
            yield _Delivery(tag, DeadJob.from_message(message), message)

    def _note(self, message: aiormq.abc.DeliveredMessage) -> int:
        delivery = message.delivery
        assert isinstance(delivery, Basic.Deliver), "a consumer only gets basic.deliver"
        tag = int(delivery.delivery_tag or 0)
        page = delivery.consumer_tag or ""
        self._page_last[page] = max(self._page_last.get(page, 0), tag)
        return tag

    async def ack(self, tag: int) -> None:
        await self.channel.basic_ack(tag)
        self._settled.add(tag)

    async def close(self) -> None:
        """Stop the consumer and requeue everything not acked, one frame per page.

        A page's tags are all below the next page's (its consumer was cancelled before the next
        started), so nacking up to each page's last tag in turn returns the messages in queue
        order. One ``multiple`` nack over several consumers would not: a quorum queue takes the
        returns consumer by consumer in no particular order, and the DLQ would come back
        shuffled page-wise.
        """
        if self.channel.is_closed:
            return
        with contextlib.suppress(*CONNECTION_ERRORS, aiormq.exceptions.AMQPError):
            if self._tag is not None:
                await self.channel.basic_cancel(self._tag)
            # Messages delivered after we stopped reading are unacked too.
            while not self._inbox.empty():
                self._note(self._inbox.get_nowait())
            for last in sorted(t for t in self._page_last.values() if t):
                await self.channel.basic_nack(last, multiple=True, requeue=True)


def replay_properties(dead: DeadJob, props: Basic.Properties) -> Basic.Properties:
    """The DLQ copy's properties for ``Q``: same id, type and body; attempt count reset.

    ``carried_headers`` drops every header Leveret manages (attempts, reason, redelivery and
    delivery counts), which is exactly what a replay must reset.
    """
    # A copy without an id ("") gets a fresh one from the AMQP client, as one without any would.
    return copy_properties(props, props.message_type or None, dead.id or "", carried_headers(props))


class DeadLetters:
    """DLQ operations for one work queue ``queue`` over one connection.

    Use as ``async with DeadLetters(settings, "email") as dlq: ...``.
    """

    def __init__(
        self,
        settings: ConnectionSettings,
        queue: str,
        *,
        page_size: int = PAGE_SIZE,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        in_flight: int = REPLAY_IN_FLIGHT,
        status_store: StatusStore | None = None,
    ) -> None:
        """``status_store`` (default: one on ``LEVERET_STATUS_URL`` when set): a replayed job
        reads ``queued`` again before it moves (``revive``)."""
        self.settings = settings
        self.queue = queue
        self.dlq = dlq_name(queue)
        self.page_size = page_size
        self.idle_timeout_s = idle_timeout_s
        self.in_flight = in_flight
        self._connection: AbstractConnection | None = None
        self._wrappers: dict[int, AbstractChannel] = {}
        self.status_store = status_store
        self._owns_store = False

    async def __aenter__(self) -> DeadLetters:
        if self.status_store is None:
            lifecycle = LifecycleSettings()
            if lifecycle.status_url is not None:
                from leveret.producers.stores import RedisStatusStore

                self.status_store = RedisStatusStore.from_url(
                    lifecycle.status_url.get_secret_value(), ttl=lifecycle.status_ttl
                )
                self._owns_store = True
        self._connection = await connect(self.settings, robust=False)
        try:
            await self.depth()
        except BaseException:
            await self._connection.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._owns_store and self.status_store is not None:
            with contextlib.suppress(Exception):
                await self.status_store.close()
        if self._connection is not None:
            await self._connection.close()

    async def _channel(self, *, confirms: bool = False) -> aiormq.abc.AbstractChannel:
        """A fresh aiormq channel; its aio-pika wrapper is kept so ``_close`` closes it once."""
        assert self._connection is not None, "use DeadLetters in `async with`"
        channel = await self._connection.channel(
            publisher_confirms=confirms, on_return_raises=confirms
        )
        raw = await channel.get_underlay_channel()
        self._wrappers[id(raw)] = channel
        return raw

    async def _close(self, raw: aiormq.abc.AbstractChannel) -> None:
        wrapper = self._wrappers.pop(id(raw), None)
        if wrapper is not None and not wrapper.is_closed:
            with contextlib.suppress(*CONNECTION_ERRORS, aiormq.exceptions.AMQPError):
                await wrapper.close()

    async def _depth_of(self, name: str) -> int:
        channel = await self._channel()
        try:
            depth = await queue_depth(channel, name)
        finally:
            await self._close(channel)
        if depth is None:
            raise DlqError(
                f"queue {name!r} does not exist in this vhost; check the queue name (a work "
                f"queue Q has its dead jobs in Q.dlq) or run `leveret topology declare APP`"
            )
        return depth

    async def depth(self) -> int:
        """Messages ready in ``Q.dlq`` (raises ``DlqError`` when it does not exist)."""
        return await self._depth_of(self.dlq)

    @contextlib.asynccontextmanager
    async def _scan(self, limit: int | None = None) -> AsyncIterator[_Scan]:
        total = await self.depth()
        if limit is not None:
            total = min(total, limit)
        scan = _Scan(await self._channel(), self.dlq, total)
        try:
            if total:
                await scan.start(self.page_size)
            yield scan
        finally:
            await scan.close()
            await self._close(scan.channel)

    async def list(
        self,
        limit: int | None = None,
        where: Filter | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> AsyncGenerator[DeadJob, None]:
        """Yield the DLQ's jobs in queue order, leaving the DLQ as it was (see module doc).

        Wrap it in ``contextlib.aclosing`` when you may stop early, so the requeue happens at
        once rather than whenever the generator is collected.
        """
        where = where or Filter()
        async with self._scan(None if not where.empty else limit) as scan:
            shown = 0
            progress = (lambda n: on_progress(n, scan.total)) if on_progress else None
            async for delivery in scan.deliveries(self.page_size, self.idle_timeout_s, progress):
                if where.matches(delivery.dead):
                    yield delivery.dead
                    shown += 1
                    if limit is not None and shown >= limit:
                        break
            if progress:
                progress(scan.received)

    async def count(self, where: Filter | None = None) -> int:
        """How many jobs match, read-only (a listing that only counts)."""
        async with contextlib.aclosing(self.list(where=where)) as jobs:
            return sum([1 async for _ in jobs])

    async def replay(
        self,
        where: Filter | None = None,
        limit: int | None = None,
        *,
        dry_run: bool = False,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Move matching jobs to ``Q``: publish confirmed, then ack the DLQ copy. Returns the
        number moved (or, with ``dry_run``, that would move)."""
        where = where or Filter()
        await self._depth_of(self.queue)  # a missing Q would only show as returned publishes
        replay = _Replay(self, await self._channel(confirms=True))
        selected = 0
        try:
            async with self._scan() as scan:
                progress = (lambda n: on_progress(n, scan.total)) if on_progress else None
                async for delivery in scan.deliveries(
                    self.page_size, self.idle_timeout_s, progress
                ):
                    if not where.matches(delivery.dead):
                        continue
                    selected += 1
                    if not dry_run:
                        await replay.start(scan, delivery)
                    if limit is not None and selected >= limit:
                        break
                await replay.wait()
        finally:
            replay.cancel()
            await self._close(replay.channel)
        if dry_run:
            return selected
        if replay.failures:
            raise DlqError(
                f"{replay.moved} job(s) replayed, {len(replay.failures)} could not be and stay "
                f"in {self.dlq} (first: {replay.failures[0]}); run the replay again"
            )
        return replay.moved

    async def purge(
        self,
        where: Filter | None = None,
        ids: Iterable[str] = (),
        limit: int | None = None,
        *,
        dry_run: bool = False,
    ) -> int:
        """Delete matching jobs (all of them without a filter), the oldest first and at most
        ``limit``; returns how many (or, with ``dry_run``, how many would go)."""
        where = where or Filter()
        if ids:
            where = Filter(frozenset(ids), where.job, where.reason, where.older_than_s, where.now)
        if where.empty and limit is None:
            if dry_run:
                return await self.depth()
            channel = await self._channel()
            try:
                ok = await channel.queue_purge(self.dlq)
                return ok.message_count or 0
            finally:
                await self._close(channel)
        deleted = 0
        async with self._scan(limit if where.empty else None) as scan:
            async for delivery in scan.deliveries(self.page_size, self.idle_timeout_s):
                if where.matches(delivery.dead):
                    if not dry_run:
                        await scan.ack(delivery.tag)
                    deleted += 1
                    if limit is not None and deleted >= limit:
                        break
        return deleted


async def _dead_again(store: StatusStore, dead: DeadJob, queue: str) -> None:
    """A revived job whose move failed is still in the DLQ: say so again (best effort)."""
    assert dead.id is not None and dead.job is not None
    key = _text(dead.headers.get(HEADER_DEDUP_KEY))
    write = status_write(
        "dead", dead.id, dead.job, queue, dead.attempts or 0, error=dead.error, dedup_key=key
    )
    with contextlib.suppress(Exception):
        # A revive holds the dedup key again; this ending frees it in the same write.
        await store.write_many([write])


class _Replay:
    """The in-flight part of a replay: at most ``in_flight`` confirmed publishes at once, each
    DLQ copy acked only once its copy in ``Q`` is confirmed.

    The client matches a returned publish to its confirm by message_id: two copies of one id in
    flight could swap returns, and a returned copy would count as moved (and its DLQ copy be
    acked, lost). So a copy whose id is in flight waits for the earlier one (``start``).
    """

    def __init__(self, dlq: DeadLetters, channel: aiormq.abc.AbstractChannel) -> None:
        self.dlq = dlq
        self.channel = channel
        self.moved = 0
        self.failures: list[str] = []
        self._gate = asyncio.Semaphore(dlq.in_flight)
        self._pending: set[asyncio.Task[None]] = set()
        self._by_id: dict[str, asyncio.Task[None]] = {}

    async def start(self, scan: _Scan, delivery: _Delivery) -> None:
        job_id = delivery.dead.id
        earlier = self._by_id.get(job_id or "")
        if earlier is not None and not earlier.done():
            await asyncio.wait({earlier})
        await self._gate.acquire()
        task = asyncio.create_task(self._move(scan, delivery))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        if job_id is not None:  # no id: the client makes a fresh one
            self._by_id[job_id] = task
            task.add_done_callback(functools.partial(self._forget, job_id))

    def _forget(self, job_id: str, task: asyncio.Task[None]) -> None:
        if self._by_id.get(job_id) is task:
            del self._by_id[job_id]

    async def _move(self, scan: _Scan, delivery: _Delivery) -> None:
        dlq, dead = self.dlq, delivery.dead
        store = dlq.status_store if dead.id and dead.job else None
        try:
            if store is not None:
                # Live again before it can run: after the move a worker may end it at once,
                # and a later revive would overwrite that ending.
                assert dead.id is not None and dead.job is not None
                key = _text(dead.headers.get(HEADER_DEDUP_KEY))
                await store.revive(dead.id, dead.job, dlq.queue, key)
            await publish_confirmed(
                self.channel,
                delivery.message.body,
                exchange="",
                routing_key=dlq.queue,
                properties=replay_properties(delivery.dead, delivery.message.header.properties),
                timeout=dlq.settings.publish_timeout,
                job=delivery.dead.job or dlq.queue,
            )
            await scan.ack(delivery.tag)  # only now: the copy in Q is safe
            self.moved += 1
        except Exception as exc:  # left unacked: it stays in the DLQ
            self.failures.append(f"{delivery.dead.id}: {type(exc).__name__}: {exc}")
            if store is not None:
                await _dead_again(store, dead, dlq.queue)
        finally:
            self._gate.release()

    async def wait(self) -> None:
        if self._pending:
            await asyncio.wait(set(self._pending))

    def cancel(self) -> None:
        for task in self._pending:
            task.cancel()
