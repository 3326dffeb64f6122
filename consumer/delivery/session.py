"""``Session``: the worker's two broker connections, from connect to close, and why it ended.

A session is two connections: one consumes (and acks, coalesced by ``Acker``), the other
publishes outcome copies with confirms. They are apart because the broker blocks a connection
that publishes during a memory or disk alarm: on one connection a single retry copy would
freeze every ack. When either closes, or the broker cancels a consumer (its queue was deleted,
its node went away), the session is over (``lost``): in-flight jobs are abandoned to the broker
(which redelivers them) and the worker opens a new session with backoff (``open_session``,
declaring the topology again), ``/readyz`` answering 503 meanwhile.

Prefetch is set per consumer (``global`` QoS is refused by quorum queues and by RabbitMQ 4.3
for every queue type): ``share`` (the worker's prefetch) deliveries per queue; with several
queues the pipeline keeps the jobs running at once within the prefetch (see ``Worker.run``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiormq.abc
import structlog
from aio_pika.abc import AbstractConnection
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type
from tenacity.wait import wait_exponential_jitter

from leveret.consumer.delivery.acker import Acker
from leveret.consumer.delivery.pipeline import Pipeline
from leveret.consumer.delivery.settle import Settler
from leveret.consumer.delivery.status_writer import StatusWriter
from leveret.consumer.features.cancellation import Cancellation
from leveret.consumer.runtime.metrics import Outcomes
from leveret.consumer.settings import WorkerSettings
from leveret.producers import BrokerUnavailable
from leveret.producers.broker import (
    CONNECTION_ERRORS,
    connect,
    deliver_directly,
    mask_secrets,
)
from leveret.producers.stores import CancelMarks, DedupStore
from leveret.producers.wire import one_line
from leveret.topology.declare import declare
from leveret.topology.model import Topology

if TYPE_CHECKING:
    from leveret.consumer.features.cancel_watch import CancelWatch

log = structlog.get_logger("leveret.worker")

# How long a finished job's ack may wait for others to share its frame (Acker, max_delay_s).
ACK_DELAY_S = 0.005
# A connection the broker blocks (alarm) may never answer a close or a cancel.
CLOSE_TIMEOUT_S = 5


async def _close_all(*connections: AbstractConnection | None) -> None:
    for conn in connections:
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), CLOSE_TIMEOUT_S)


@dataclass(frozen=True, eq=False)
class Plan:
    """What every session of one ``Worker.run`` consumes, and who hears of it."""

    settings: WorkerSettings
    topology: Topology
    queues: list[str]
    share: int  # prefetch per consumer
    outcomes: Outcomes
    failures: dict[str, int]  # job id -> settles failed in a row (see Settler)
    pipeline: Pipeline
    on_lost: Callable[[], None]  # not ready: the session is over or about to be
    # With LEVERET_STATUS_URL: the writer every session's settle records statuses with (one
    # per worker process; an ending write also frees the job's dedup key) ...
    status: StatusWriter | None = None
    # ... the cancellation marks (each session runs a CancelWatch on them), and the claims of
    # ``ctx.enqueue(..., dedup_key=…)``, on the same Redis.
    cancel_marks: CancelMarks | None = None
    dedup: DedupStore | None = None
    # The chain's cancellation layer (with a status store), whose ids each CancelWatch fills.
    cancellation: Cancellation | None = None


class Session:
    # Set by _open, before open_session hands the session to anyone.
    consume: aiormq.abc.AbstractChannel
    acker: Acker
    settler: Settler

    def __init__(self, connection: AbstractConnection, plan: Plan) -> None:
        self.connection = connection
        self.plan = plan
        self.publish_connection: AbstractConnection | None = None
        self.watch: CancelWatch | None = None
        self.lost = asyncio.Event()
        self.consumer_tags: dict[str, str] = {}  # consumer tag -> queue
        # Set when the broker cancelled one of our consumers (basic.cancel).
        self.cancelled_by_broker: str | None = None

    async def _open(self) -> None:
        plan, settings = self.plan, self.plan.settings
        await declare(self.connection, plan.topology)
        if settings.history_url is not None:  # its events wait there for a history writer
            from leveret.consumer.history.queue import declare_history_queue

            history = await self.connection.channel()
            await declare_history_queue(history, settings.exchange, settings.queue_type)
            await history.close()
        # Outcome copies on a connection of their own (see the module docstring).
        self.publish_connection = await connect(settings, robust=False)
        # Opened on aiormq directly for its frame buffer: aio-pika leaves aiormq's default of
        # 10 frames, about three deliveries, so a loop turn handled three jobs and settled them
        # in batches of three. Room for every prefetched delivery's frames lets a turn take all
        # that arrived (measured with LEVERET_EVENTS=outcomes: 191 -> 142 µs CPU per job).
        transport = self.connection.transport
        assert transport is not None  # connected: declare just ran on it
        prefetch = plan.share * len(plan.queues)
        self.consume = await transport.connection.channel(
            publisher_confirms=False, frame_buffer_size=max(10, 3 * prefetch)
        )
        publish = await (
            await self.publish_connection.channel(publisher_confirms=True, on_return_raises=True)
        ).get_underlay_channel()
        # Deliveries straight to the pipeline (no aiormq task wrapper per delivery); the
        # consuming channel's close then cancels the in-flight runs here, as aiormq would.
        direct = deliver_directly(self.consume, self._consume_closed)
        for channel in (self.consume, publish):
            channel.closing.add_done_callback(lambda _: self.lost.set())
        await self.consume.basic_qos(prefetch_count=plan.share, global_=False)
        # Coalesce acks over a few ms once jobs come fast (see Acker); a small prefetch (batch
        # 1) still flushes every loop turn, so it never waits on a timer.
        self.acker = Acker(self.consume, prefetch=prefetch, max_delay_s=ACK_DELAY_S)
        self.settler = Settler(
            publish,
            self.acker,
            settings.exchange,
            plan.outcomes,
            plan.failures,
            timeout_s=settings.publish_timeout,
            events_mode=settings.events_mode,
            result_max_bytes=settings.result_max_bytes,
            status=plan.status,
            queue_of={name: spec.queue for name, spec in plan.pipeline.jobs.items()},
            dedup=plan.dedup,
        )
        await self._start_cancel_watch()
        self.consume.on_consumer_cancel_callbacks.add(self._on_cancel)
        for q in plan.queues:
            tag = f"leveret.{uuid.uuid4().hex}"
            if direct is not None:  # registered first: the first delivery may follow ConsumeOk
                direct[tag] = functools.partial(plan.pipeline.start, self.settler, self.lost, q)
            callback = functools.partial(plan.pipeline.on_message, self.settler, self.lost, q)
            ok = await self.consume.basic_consume(q, callback, no_ack=False, consumer_tag=tag)
            self.consumer_tags[str(ok.consumer_tag)] = q

    def _consume_closed(self) -> None:
        """The consuming channel closed: its deliveries' runs are cancelled (lost first, so
        none of them publishes a copy or gives its job back: the broker redelivers)."""
        self.lost.set()
        for task in list(self.plan.pipeline.tasks):
            task.cancel()

    async def _start_cancel_watch(self) -> None:
        """With a status store: the cancel watch."""
        plan, settings = self.plan, self.plan.settings
        if plan.cancel_marks is not None and plan.cancellation is not None:
            from leveret.consumer.features.cancel_watch import CancelWatch

            # Before consuming: the marks are loaded, so a job cancelled while no worker ran
            # is refused from the first delivery.
            # It fills the chain's cancellation layer's ids (the worker's, outliving sessions).
            self.watch = CancelWatch(
                self.connection,
                plan.cancel_marks,
                exchange=settings.exchange,
                ttl=settings.status_ttl,
                on_cancel=plan.cancellation.cancel,
                ids=plan.cancellation.ids,
            )
            await self.watch.start()

    async def serve(self, stopping: asyncio.Event) -> None:
        """Wait until the session is lost or a stop is asked for, then wind it down."""
        # Which node: with a cluster's nodes in LEVERET_AMQP_URL, the one that answered (the
        # connection's str() masks the password); /readyz says it too (see health.py).
        node = str(self.connection)
        self.plan.outcomes.metrics.node = node
        log.info(
            "consuming", queues=self.plan.queues, prefetch_per_queue=self.plan.share, node=node
        )
        stop = asyncio.ensure_future(stopping.wait())
        lost = asyncio.ensure_future(self.lost.wait())
        await asyncio.wait((stop, lost), return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        lost.cancel()
        self.plan.on_lost()
        tasks, settings = self.plan.pipeline.tasks, self.plan.settings
        if self.lost.is_set() and not stopping.is_set():
            await self.abandon(tasks, settings.amqp_url.get_secret_value())
        else:
            await self.shutdown(tasks, settings.shutdown_grace)

    def _on_cancel(self, frame: Any) -> None:
        # The broker dropped a consumer (queue deleted or recreated, its node gone): end the
        # session so a new one declares the queue again and resubscribes.
        queue = self.consumer_tags.get(frame.consumer_tag, "?")
        self.cancelled_by_broker = queue
        log.warning(
            "consumer_cancelled_by_broker",
            queue=queue,
            action="reconnecting to declare and consume again",
        )
        self.plan.on_lost()
        self.lost.set()

    def close_reason(self, url: str) -> str:
        """Why the session ended, in one password-free line (a channel close says why)."""
        if self.cancelled_by_broker is not None:
            return f"the broker cancelled the consumer of queue {self.cancelled_by_broker}"
        closing = self.consume.closing
        exc = None if not closing.done() or closing.cancelled() else closing.exception()
        if exc is None:
            return "connection lost"
        reason = one_line(f"{type(exc).__name__}: {exc}")
        return mask_secrets(reason, url)

    async def abandon(self, tasks: set[asyncio.Task[Any]], url: str) -> None:
        """The session was lost: say why, drop the in-flight jobs (the broker redelivers)."""
        reason = self.close_reason(url)
        log.warning(
            "connection_lost",
            unacked=self.acker.in_flight,
            reason=reason,
            action="reconnecting; unacked jobs are redelivered by the broker",
        )
        if "acknowledgement" in reason and "timed out" in reason:
            log.error(
                "consumer_timeout_exceeded",
                advice="a job ran longer than the broker's consumer_timeout, so the broker "
                "closed the channel and will redeliver its jobs; raise consumer_timeout above "
                "the longest job, or give long jobs a timeout= below it",
            )
        for task in list(tasks):
            task.cancel()
        await self.close()

    async def shutdown(self, tasks: set[asyncio.Task[Any]], grace: float) -> None:
        """Stop consuming, give in-flight jobs ``grace`` seconds, send the last acks, close."""
        log.info("worker_stopping", in_flight=len(tasks), grace_s=grace)
        for tag in self.consumer_tags:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.consume.basic_cancel(tag), CLOSE_TIMEOUT_S)
        if tasks:
            _, pending = await asyncio.wait(set(tasks), timeout=grace)
            settling = pending & self.plan.pipeline.settling
            if settling:
                # Their runs are over and their copies may be on the wire: giving them back
                # would make a second live copy. Wait for their confirms (bounded) and acks.
                log.info("waiting_for_settling_jobs", count=len(settling))
                wait_s = (self.plan.settings.publish_timeout or CLOSE_TIMEOUT_S) + 1
                await asyncio.wait(settling, timeout=wait_s)
                pending = {t for t in pending if not t.done()}
            if pending:
                log.warning("returning_unfinished_jobs", count=len(pending))
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=CLOSE_TIMEOUT_S)
        # Send the last coalesced acks before closing, or finished jobs would run again.
        with contextlib.suppress(Exception):
            await self.acker.drain()
        await self.close()

    async def close(self) -> None:
        if self.watch is not None:
            watch, self.watch = self.watch, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(watch.stop(), CLOSE_TIMEOUT_S)
        await _close_all(self.connection, self.publish_connection)


def _log_connect_failure(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning(
        "broker_unavailable",
        error=str(exc),
        attempt=state.attempt_number,
        retry_in_s=round(state.upcoming_sleep, 2),
    )


async def open_session(
    plan: Plan, sleep: Callable[[float], Awaitable[None]], stopping: asyncio.Event
) -> Session | None:
    """Connect, declare and consume, retrying with backoff until it works or we stop."""
    retrying = AsyncRetrying(
        wait=wait_exponential_jitter(multiplier=0.5, max=30),
        retry=retry_if_exception_type((BrokerUnavailable, *CONNECTION_ERRORS)),
        before_sleep=_log_connect_failure,
        sleep=sleep,
        reraise=True,
    )
    async for attempt in retrying:
        if stopping.is_set():
            return None
        with attempt:
            session = Session(await connect(plan.settings, robust=False), plan)
            try:
                await session._open()
            except BaseException:
                await session.close()
                raise
            return session
    return None  # pragma: no cover - AsyncRetrying either returns or raises


async def consume(
    plan: Plan,
    sleep: Callable[[float], Awaitable[None]],
    stopping: asyncio.Event,
    on_session: Callable[[Session | None], None],
    stop: Callable[[], None],
) -> None:
    """Open sessions one after another until stopped; each ends lost or shut down.

    ``on_session`` hears of each session once it consumes, and ``None`` when it ended.
    """
    session: Session | None = None
    try:
        while not stopping.is_set():
            session = await open_session(plan, sleep, stopping)
            if session is None:
                break
            on_session(session)
            await session.serve(stopping)
            on_session(None)
            session = None
    except asyncio.CancelledError:
        # The task running us was cancelled (an app embedding the worker): wind down like
        # stop(), or the consuming session would outlive us with its jobs failing.
        log.info("worker_cancelled", action="shutting down like stop()")
        stop()
        if session is not None:
            await session.shutdown(plan.pipeline.tasks, plan.settings.shutdown_grace)
        raise
