"""``Worker``: registrations, the consume loop, reconnects and graceful shutdown.

The loop talks to aiormq's channels directly: aiormq already runs each delivery as its own
task, and skipping aio-pika's per-message wrapper is a large share of the per-job CPU. Prefetch
bounds the deliveries held at once, so it *is* the concurrency; nothing else limits it.

A session is two connections: one consumes (and acks, coalesced by ``Acker``), the other
publishes outcome copies with confirms. They are apart because the broker blocks a connection
that publishes during a memory or disk alarm: on one connection a single retry copy would
freeze every ack. When either closes, or the broker cancels a consumer (its queue was deleted,
its node went away), the session is over: in-flight jobs are abandoned to the broker (which
redelivers them) and a new session is opened with backoff (declaring the topology again),
``/readyz`` answering 503 meanwhile.

Prefetch is set per consumer (``global`` QoS is refused by quorum queues and by RabbitMQ 4.3 for
every queue type). With several queues the worker's ``prefetch`` is divided between them, each
consumer getting ``max(1, prefetch // len(queues))``, so the total held stays at most
``prefetch`` (or one per queue when there are more queues than that).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiormq
import structlog
from aio_pika.abc import AbstractConnection
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type
from tenacity.wait import wait_exponential_jitter
from yarl import URL

from leveret.producers.connection import CONNECTION_ERRORS, connect, mask_url
from leveret.producers.errors import BrokerUnavailable
from leveret.producers.message import CONTENT_TYPE, HEADER_ATTEMPTS, one_line
from leveret.topology.declare import declare
from leveret.topology.model import DELAY_BITS, MAX_DELAY_S, Topology

from .acker import Acker
from .context import JobContext
from .errors import ConfigError, Reject
from .health import HealthServer
from .metrics import DEAD_LETTERED, RETRIED, SUCCEEDED, UNKNOWN_JOB, WorkerMetrics
from .registry import DEFAULT_BACKOFF, DEFAULT_MAX_ATTEMPTS, DEFAULT_QUEUE, Backoff, Registry
from .settings import WorkerSettings
from .settle import SettleFailed, Settler
from .threads import JobThreads

F = TypeVar("F", bound=Callable[..., Any])

# How long a finished job's ack may wait for others to share its frame (Acker, max_delay_s).
ACK_DELAY_S = 0.005
# After an outcome copy was refused or not confirmed, wait this long (doubling per failure of
# the same job, up to the cap) before giving the job back: a refusing DLQ must not turn into a
# redelivery loop running once a millisecond.
SETTLE_BACKOFF_S = 0.5
SETTLE_BACKOFF_MAX_S = 30.0
# Jobs whose settle failures are remembered (oldest forgotten first).
SETTLE_FAILURES_KEPT = 10_000

log = structlog.get_logger("leveret.worker")


class _BadMessage(Exception):
    """The message cannot be run as it is: dead-letter it as ``invalid``."""


@dataclass(eq=False)
class _Session:
    connection: AbstractConnection
    consume: aiormq.abc.AbstractChannel
    settler: Settler
    acker: Acker
    lost: asyncio.Event
    publish_connection: AbstractConnection | None = None
    consumer_tags: list[str] = field(default_factory=list)
    # Set when the broker cancelled one of our consumers (basic.cancel).
    cancelled_by_broker: str | None = None


@dataclass(slots=True)
class _Children:
    """Metric children for one (queue, job): resolved once, not per message."""

    started: Any
    succeeded: Any
    retried: Any
    dead_lettered: Any
    duration: Any


class Worker:
    """Runs registered jobs from RabbitMQ; settings come from ``LEVERET_*``."""

    def __init__(
        self,
        settings: WorkerSettings | None = None,
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings if settings is not None else WorkerSettings()
        self.jobs = Registry()
        self._metrics_registry = registry
        self._stopping: asyncio.Event | None = None
        self._connected = False
        self._threads_exhausted = False
        self._settle_failures: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._children: dict[tuple[str, str], _Children] = {}
        self._in_progress: dict[str, Any] = {}
        self._counts = {SUCCEEDED: 0, RETRIED: 0, DEAD_LETTERED: 0}
        # job id -> set once the redelivery guard's counted copy is confirmed and the original
        # acked (see _redelivery_guard).
        self._counting: dict[str, asyncio.Event] = {}
        self.health_port: int | None = None

    # -- registration ---------------------------------------------------------------------

    def job(
        self,
        name: str,
        *,
        queue: str = DEFAULT_QUEUE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff: Backoff = DEFAULT_BACKOFF,
        timeout: float | None = None,
    ) -> Callable[[F], F]:
        """Register a handler; the function is returned unchanged so tests can call it.

        ``timeout`` cancels an ``async`` handler. A plain ``def`` handler cannot be stopped
        (Python has no way to stop a thread): at its timeout the worker stops waiting and
        retries or dead-letters the job, but the function runs on in its thread until it
        returns, possibly beside its own retry. The timeout counts from when a thread starts
        the job. See ``JobThreads`` and docs/reliability.md, "Limits".
        """

        def register(fn: F) -> F:
            self.jobs.add(fn, name, queue, max_attempts, backoff, timeout)
            return fn

        return register

    @property
    def topology(self) -> Topology:
        return self.jobs.topology(self.settings.exchange, self.settings.queue_type)

    @property
    def ready(self) -> bool:
        """Connected to the broker, consuming, and able to start a plain ``def`` job."""
        return self._connected and not self._threads_exhausted

    # -- running ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask a running worker to shut down gracefully (what SIGTERM does)."""
        if self._stopping is not None:
            if self._stopping.is_set():
                log.warning("second_stop_signal", action="giving up on in-flight jobs now")
                for task in list(self._tasks):
                    task.cancel()
            self._stopping.set()

    async def run(
        self,
        queues: list[str] | None = None,
        *,
        prefetch: int | None = None,
        handle_signals: bool = False,
    ) -> None:
        """Consume until ``stop()`` (or SIGTERM/SIGINT with ``handle_signals``).

        Cancelling the task that runs this shuts the worker down like ``stop()`` (in-flight jobs
        get the grace period, the connections are closed), then raises ``CancelledError``.
        """
        if not self.jobs.jobs:
            raise ConfigError("this worker has no jobs: register handlers with @worker.job(...)")
        known = self.jobs.queues
        queues = list(dict.fromkeys(queues or known))
        unknown = [q for q in queues if q not in known]
        if unknown:
            raise ConfigError(
                f"no job is registered on queue(s) {', '.join(unknown)}; "
                f"this app serves: {', '.join(known)}"
            )
        prefetch = prefetch or self.settings.prefetch
        # Per-consumer prefetch, divided between the queues (see the module docstring).
        share = max(1, prefetch // len(queues))
        held = share * len(queues)
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._metrics = WorkerMetrics.for_registry(self._metrics_registry)
        for q in queues:
            self._metrics.prefetch.labels(queue=q).set(share)
            self._in_progress[q] = self._metrics.in_progress.labels(queue=q)
        health = None
        if self.settings.metrics_port:
            health = HealthServer(
                self.settings.metrics_host,
                self.settings.metrics_port,
                self._metrics.registry,
                lambda: self.ready,
            )
            await health.start()
            self.health_port = health.port
        # Plain `def` handlers run here; as many threads as jobs may be held at once, never more
        # (a hung handler keeps its thread: see JobThreads).
        threads = JobThreads(held)
        threads.on_exhausted_change = self._on_threads_exhausted
        self._threads = threads
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        log.info(
            "worker_starting",
            broker=mask_url(self.settings.amqp_url.get_secret_value()),
            queues=queues,
            prefetch=prefetch,
            prefetch_per_queue=share,
            jobs=sorted(self.jobs.jobs),
        )
        from .dlq_depth import DlqDepthRefresher
        from .doctor import log_findings

        # Operator checks (logged, never fatal) and the DLQ depth gauge run beside the loop.
        self._dlq_depth = DlqDepthRefresher(queues, self._metrics.dlq_messages)
        self._dlq_depth.start()
        doctor = asyncio.create_task(log_findings(self.settings, self.jobs, self.topology))
        session: _Session | None = None
        try:
            while not self._stopping.is_set():
                session = await self._open_session(queues, share)
                if session is None:
                    break
                await self._serve(session)
                session = None
        except asyncio.CancelledError:
            # The task running us was cancelled (an app embedding the worker): wind down like
            # stop(), or the consuming session would outlive us with its jobs failing.
            log.info("worker_cancelled", action="shutting down like stop()")
            self.stop()
            if session is not None:
                await self._shutdown(session)
            raise
        finally:
            self._set_ready(False)
            doctor.cancel()
            await self._dlq_depth.stop()
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            if health is not None:
                await health.stop()
            threads.shutdown()
            log.info("worker_stopped", **self._counts)

    def _set_ready(self, ready: bool) -> None:
        self._connected = ready
        self._report_ready()

    def _report_ready(self) -> None:
        if hasattr(self, "_metrics"):
            self._metrics.connected.set(1 if self.ready else 0)

    def _on_threads_exhausted(self, exhausted: bool) -> None:
        self._threads_exhausted = exhausted
        self._metrics.threads_stuck.set(self._threads.stuck)
        if exhausted:
            log.error(
                "job_threads_exhausted",
                threads=self._threads.size,
                advice="every thread for plain `def` jobs is still running a job that timed "
                "out (Python cannot stop a thread); no `def` job starts until one returns. "
                "Not ready until then; a restart ends them",
            )
        else:
            log.warning("job_threads_available", stuck=self._threads.stuck)
        self._report_ready()

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        assert self._stopping is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    @staticmethod
    def _log_connect_failure(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "broker_unavailable",
            error=str(exc),
            attempt=state.attempt_number,
            retry_in_s=round(state.upcoming_sleep, 2),
        )

    async def _open_session(self, queues: list[str], prefetch: int) -> _Session | None:
        """Connect, declare and consume, retrying with backoff until it works or we stop."""
        retrying = AsyncRetrying(
            wait=wait_exponential_jitter(multiplier=0.5, max=30),
            retry=retry_if_exception_type((BrokerUnavailable, *CONNECTION_ERRORS)),
            before_sleep=self._log_connect_failure,
            sleep=self._sleep_unless_stopped,
            reraise=True,
        )
        assert self._stopping is not None
        async for attempt in retrying:
            if self._stopping.is_set():
                return None
            with attempt:
                return await self._connect_session(queues, prefetch)
        return None  # pragma: no cover - AsyncRetrying either returns or raises

    async def _connect_session(self, queues: list[str], share: int) -> _Session:
        connection = await connect(self.settings, robust=False)
        publish_connection: AbstractConnection | None = None
        try:
            await declare(connection, self.topology)
            # Outcome copies on a connection of their own (see the module docstring).
            publish_connection = await connect(self.settings, robust=False)
            lost = asyncio.Event()
            consume = await (
                await connection.channel(publisher_confirms=False)
            ).get_underlay_channel()
            publish = await (
                await publish_connection.channel(publisher_confirms=True, on_return_raises=True)
            ).get_underlay_channel()
            for channel in (consume, publish):
                channel.closing.add_done_callback(lambda _: lost.set())
            # Per-consumer QoS (global_=False): `share` deliveries per queue.
            await consume.basic_qos(prefetch_count=share, global_=False)
            # Coalesce acks over a few ms once jobs come fast (see Acker); a small prefetch
            # (batch 1) still flushes every loop turn, so it never waits on a timer.
            acker = Acker(consume, prefetch=share * len(queues), max_delay_s=ACK_DELAY_S)
            settler = Settler(
                publish, acker, self.settings.exchange, timeout_s=self.settings.publish_timeout
            )
            session = _Session(connection, consume, settler, acker, lost, publish_connection)
            by_tag: dict[str, str] = {}

            def on_cancel(frame: Any) -> None:
                # The broker dropped a consumer (queue deleted or recreated, its node gone):
                # end the session so a new one declares the queue again and resubscribes.
                queue = by_tag.get(frame.consumer_tag, "?")
                session.cancelled_by_broker = queue
                log.warning("consumer_cancelled_by_broker", queue=queue,
                            action="reconnecting to declare and consume again")  # fmt: skip
                self._set_ready(False)
                lost.set()

            consume.on_consumer_cancel_callbacks.add(on_cancel)
            for q in queues:
                ok = await consume.basic_consume(
                    q, functools.partial(self._on_message, session, q), no_ack=False
                )
                session.consumer_tags.append(ok.consumer_tag)
                by_tag[ok.consumer_tag] = q
        except BaseException:
            for conn in (connection, publish_connection):
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 5)
            raise
        self._set_ready(True)
        if hasattr(self, "_dlq_depth"):
            self._dlq_depth.attach(connection)
        log.info("consuming", queues=queues, prefetch_per_queue=share)
        return session

    @staticmethod
    async def _close(session: _Session) -> None:
        # Bounded: a connection the broker blocks (alarm) may never answer the close.
        for conn in (session.connection, session.publish_connection):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 5)

    async def _serve(self, session: _Session) -> None:
        """Wait until the session is lost or a stop is asked for, then wind it down."""
        assert self._stopping is not None
        stop = asyncio.ensure_future(self._stopping.wait())
        lost = asyncio.ensure_future(session.lost.wait())
        await asyncio.wait((stop, lost), return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        lost.cancel()
        self._set_ready(False)
        if session.lost.is_set() and not self._stopping.is_set():
            reason = (
                f"the broker cancelled the consumer of queue {session.cancelled_by_broker}"
                if session.cancelled_by_broker is not None
                else self._close_reason(session)
            )
            log.warning(
                "connection_lost",
                unacked=session.acker.in_flight,
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
            for task in list(self._tasks):
                task.cancel()
            await self._close(session)
            return
        await self._shutdown(session)

    def _close_reason(self, session: _Session) -> str:
        """Why the session ended, in one password-free line (a channel close says why)."""
        closing = session.consume.closing
        exc = None if not closing.done() or closing.cancelled() else closing.exception()
        if exc is None:
            return "connection lost"
        reason = one_line(f"{type(exc).__name__}: {exc}")
        password = URL(self.settings.amqp_url.get_secret_value()).password
        return reason.replace(password, "******") if password else reason

    async def _shutdown(self, session: _Session) -> None:
        grace = self.settings.shutdown_grace
        log.info("worker_stopping", in_flight=len(self._tasks), grace_s=grace)
        for tag in session.consumer_tags:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(session.consume.basic_cancel(tag), 5)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            if pending:
                log.warning("returning_unfinished_jobs", count=len(pending))
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=5)
        # Send the last coalesced acks before closing, or finished jobs would run again.
        with contextlib.suppress(Exception):
            await session.acker.drain()
        await self._close(session)

    # -- one delivery -------------------------------------------------------------------------

    def _children_for(self, queue: str, job: str) -> _Children:
        children = self._children.get((queue, job))
        if children is None:
            m = self._metrics
            children = self._children[(queue, job)] = _Children(
                started=m.started.labels(queue=queue, job=job),
                succeeded=m.completed.labels(queue=queue, job=job, outcome=SUCCEEDED),
                retried=m.completed.labels(queue=queue, job=job, outcome=RETRIED),
                dead_lettered=m.completed.labels(queue=queue, job=job, outcome=DEAD_LETTERED),
                duration=m.duration.labels(queue=queue, job=job),
            )
        return children

    async def _on_message(
        self, session: _Session, queue: str, message: aiormq.abc.DeliveredMessage
    ) -> None:
        tag = message.delivery.delivery_tag
        session.acker.track(tag)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        props = message.header.properties
        name = self._job_name(props, message.delivery.routing_key)
        job_id = props.message_id or str(uuid.uuid4())
        try:
            if not props.message_id:
                # Informational: a failing log sink must not keep the job from running (its
                # id is new on every delivery, so a give-back could never back off either).
                with contextlib.suppress(Exception):
                    log.warning("job_id_assigned", job_id=job_id, queue=queue,
                                reason="message arrived without message_id")  # fmt: skip
            await self._process(session, queue, message, name, job_id)
        except asyncio.CancelledError:
            # Shutdown grace ran out: give the job back unburnt. Cancelled because the channel
            # went away (aiormq cancels consumers before our `lost` flag is set, e.g. when the
            # broker's consumer_timeout closes the channel): publish nothing, or the broker's
            # own redelivery would double the job.
            stopping = self._stopping is not None and self._stopping.is_set()
            if stopping and not session.lost.is_set() and not session.consume.is_closed:
                try:
                    await session.settler.give_back(message, queue, name, job_id)
                except Exception:
                    with contextlib.suppress(Exception):
                        await session.acker.nack(tag, requeue=True)
            elif not session.lost.is_set():
                with contextlib.suppress(Exception):
                    await session.acker.nack(tag, requeue=True)
        except Exception as exc:
            # SettleFailed, or anything unexpected on the way (a log call, a metric): the job
            # still gets exactly one outcome. If it was settled already there is nothing to do.
            if not session.acker.settled(tag):
                await self._give_back_later(session, queue, tag, job_id, exc)
            else:
                with contextlib.suppress(Exception):
                    log.error("job_error_after_settle", job_id=job_id, queue=queue,
                              error=one_line(f"{type(exc).__name__}: {exc}"))  # fmt: skip
        finally:
            self._tasks.discard(task)

    async def _give_back_later(
        self, session: _Session, queue: str, tag: int, job_id: str, exc: Exception
    ) -> None:
        """Nack an unsettled job for redelivery, after a backoff that grows per job id.

        The outcome copy was refused or never confirmed (a DLQ at max-length with
        reject-publish, a deleted DLQ, an alarm) or something else failed before an outcome:
        requeueing at once would spin the job round the broker about once a millisecond.
        """
        failures = self._settle_failures.pop(job_id, 0) + 1
        self._settle_failures[job_id] = failures
        while len(self._settle_failures) > SETTLE_FAILURES_KEPT:
            self._settle_failures.pop(next(iter(self._settle_failures)))
        delay = min(SETTLE_BACKOFF_S * 2 ** min(failures - 1, 16), SETTLE_BACKOFF_MAX_S)
        with contextlib.suppress(Exception):
            self._metrics.settle_failures.labels(queue=queue).inc()
        with contextlib.suppress(Exception):
            event = "settle_failed" if isinstance(exc, SettleFailed) else "job_internal_error"
            log.error(event, job_id=job_id, queue=queue, failures=failures,
                      error=one_line(f"{type(exc).__name__}: {exc}"), retry_in_s=delay,
                      action="job given back after the backoff; it will run again")  # fmt: skip
        await self._sleep_unless_stopped(delay)
        if not session.lost.is_set():
            with contextlib.suppress(Exception):
                await session.acker.nack(tag, requeue=True)

    @staticmethod
    def _job_name(props: Any, routing_key: str | None) -> str:
        if props.message_type:
            return props.message_type
        key = routing_key or ""
        words = key.split(".")
        # A delayed publish without `type`: "<bits>.j.<job>".
        if len(words) > DELAY_BITS + 1 and words[DELAY_BITS] == "j":
            return ".".join(words[DELAY_BITS + 1 :])
        return key

    def _check(self, message: aiormq.abc.DeliveredMessage) -> int:
        """Validate the envelope; return the attempts already made."""
        props = message.header.properties
        if props.content_encoding not in (None, "", "identity", "utf-8", "UTF-8"):
            raise _BadMessage(f"unsupported content-encoding {props.content_encoding!r}")
        ctype = props.content_type
        if ctype and ctype.split(";")[0].strip().lower() != CONTENT_TYPE:
            raise _BadMessage(f"content type {ctype!r} is not {CONTENT_TYPE}")
        if len(message.body) > self.settings.max_body_bytes:
            raise _BadMessage(
                f"body of {len(message.body)} bytes exceeds LEVERET_MAX_BODY_BYTES "
                f"({self.settings.max_body_bytes})"
            )
        headers = props.headers
        raw = headers.get(HEADER_ATTEMPTS, 0) if headers else 0
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
            raise _BadMessage(
                f"header {HEADER_ATTEMPTS} must be a non-negative integer, got {raw!r}"
            )
        return raw

    async def _process(
        self,
        session: _Session,
        queue: str,
        message: aiormq.abc.DeliveredMessage,
        name: str,
        job_id: str,
    ) -> None:
        props = message.header.properties
        spec = self.jobs.jobs.get(name)
        settler = session.settler
        try:
            prior = self._check(message)
        except _BadMessage as exc:
            await self._dead_without_run(
                session, queue, message, name, job_id, "invalid", str(exc), 0
            )
            return
        if spec is None:
            await self._dead_without_run(
                session, queue, message, name, job_id, "unknown_job",
                f"no handler for job {name!r} on queue {queue!r}", prior,
            )  # fmt: skip
            return
        if self._counting and job_id in self._counting:
            # This is the guard's counted copy, delivered before the original's ack was out:
            # running it now, a crash would requeue both and the count would never add up.
            await self._counting[job_id].wait()
        if message.delivery.redelivered and await self._redelivery_guard(
            session, queue, message, name, job_id, prior
        ):
            return
        try:
            payload = spec.validate(message.body)
        except ValidationError as exc:
            first = exc.errors()[0] if exc.error_count() else {}
            where = ".".join(str(p) for p in first.get("loc", ())) or "body"
            error = (
                f"ValidationError: {exc.error_count()} error(s); {where}: {first.get('msg', exc)}"
            )
            await self._dead_without_run(
                session, queue, message, name, job_id, "invalid", error, prior
            )
            return
        except Exception as exc:
            # Whatever the payload's validation raises makes the payload invalid.
            await self._dead_without_run(
                session,
                queue,
                message,
                name,
                job_id,
                "invalid",
                f"{type(exc).__name__}: {exc}",
                prior,
            )
            return

        attempt = prior + 1
        children = self._children_for(queue, spec.name)
        in_progress = self._in_progress[queue]
        structlog.contextvars.bind_contextvars(
            job_id=job_id, job=spec.name, queue=queue, attempt=attempt
        )
        ctx = JobContext(
            job_id=job_id,
            job=spec.name,
            queue=queue,
            attempt=attempt,
            max_attempts=spec.max_attempts,
            log=log,
            redelivered=message.delivery.redelivered,
            priority=props.priority,
            headers=props.headers or {},
        )
        children.started.inc()
        in_progress.inc()
        error: BaseException | None = None
        started = time.perf_counter()
        try:
            args = (payload, ctx) if spec.takes_ctx else (payload,)
            if spec.is_async:
                if spec.timeout_s is None:
                    await spec.fn(*args)
                else:
                    async with asyncio.timeout(spec.timeout_s):
                        await spec.fn(*args)
            else:
                # The timeout counts from when a thread starts the job (see JobThreads).
                call = functools.partial(contextvars.copy_context().run, spec.fn, *args)
                await self._threads.run(call, spec.timeout_s)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                in_progress.dec()
                raise  # we cancelled it (shutdown, lost connection): give the job back
            # The handler raised CancelledError itself (e.g. from a sub-task it awaited): a
            # failure like any other, not a reason to requeue it unburnt forever.
            error = exc
        except TimeoutError as exc:
            error = (
                exc
                if spec.timeout_s is None
                else TimeoutError(f"job overran its timeout of {spec.timeout_s:g} s")
            )
        except BaseException as exc:
            error = exc
        duration = time.perf_counter() - started
        children.duration.observe(duration)
        in_progress.dec()

        # Each outcome below forgets the job's failed settles once it is out (a redelivery
        # guard's requeue is no outcome, so the backoff keeps growing across those).
        if error is None:
            session.acker.ack(message.delivery.delivery_tag)
            self._settle_failures.pop(job_id, None)
            children.succeeded.inc()
            self._counts[SUCCEEDED] += 1
            log.debug("job_succeeded", duration_s=round(duration, 6))
            return
        described = one_line(f"{type(error).__name__}: {error}")
        rejected = isinstance(error, Reject)
        if rejected or attempt >= spec.max_attempts:
            reason = "rejected" if rejected else "exhausted"
            await settler.dead_letter(message, queue, spec.name, job_id, reason=reason,
                                      error=described, attempts=attempt)  # fmt: skip
            self._settle_failures.pop(job_id, None)
            children.dead_lettered.inc()
            self._counts[DEAD_LETTERED] += 1
            # A rejection is the handler's own decision; running out of attempts is a failure.
            (log.warning if rejected else log.error)(
                "job_dead_lettered", reason=reason, error=described, duration_s=round(duration, 6)
            )
            if not rejected:
                log.debug("job_traceback", exc_info=error)
        else:
            delay = self._retry_delay(spec, attempt, error, described)
            await settler.retry(message, queue, spec.name, job_id, attempt, delay)
            self._settle_failures.pop(job_id, None)
            children.retried.inc()
            self._counts[RETRIED] += 1
            log.warning("job_retried", error=described, retry_in_s=round(delay, 3),
                        duration_s=round(duration, 6))  # fmt: skip
            log.debug("job_traceback", exc_info=error)

    @staticmethod
    def _retry_delay(spec: Any, attempt: int, error: BaseException, described: str) -> float:
        """The backoff's delay; one that raises or returns NaN falls back to 2 ** attempt s."""
        try:
            return float(spec.delay_after(attempt, error if isinstance(error, Exception) else
                                          RuntimeError(described)))  # fmt: skip
        except Exception as exc:
            delay = min(2.0**attempt, MAX_DELAY_S)
            with contextlib.suppress(Exception):
                log.error("backoff_failed", error=one_line(f"{type(exc).__name__}: {exc}"),
                          retry_in_s=delay)  # fmt: skip
            return delay

    async def _dead_without_run(
        self,
        session: _Session,
        queue: str,
        message: aiormq.abc.DeliveredMessage,
        name: str,
        job_id: str,
        reason: str,
        error: str,
        attempts: int,
    ) -> None:
        """Dead-letter a message no handler could take; metrics never take wire values."""
        label = name if name in self.jobs.jobs else UNKNOWN_JOB
        await session.settler.dead_letter(
            message, queue, name or "", job_id, reason=reason, error=error, attempts=attempts
        )
        self._settle_failures.pop(job_id, None)
        self._children_for(queue, label).dead_lettered.inc()
        self._counts[DEAD_LETTERED] += 1
        log.error("job_dead_lettered", job_id=job_id, job=label, queue=queue, reason=reason,
                  error=one_line(error))  # fmt: skip

    async def _redelivery_guard(
        self,
        session: _Session,
        queue: str,
        message: aiormq.abc.DeliveredMessage,
        name: str,
        job_id: str,
        prior: int,
    ) -> bool:
        """Count broker redeliveries durably; dead-letter a job that keeps killing workers.

        The broker's redelivered flag is a boolean and classic queues keep no count, so the
        count is persisted by republishing the job with ``x-redeliveries`` + 1 (confirmed) and
        acking the original. Returns True when the message was handled here.
        """
        headers = message.header.properties.headers or {}
        count = headers.get("x-delivery-count")  # quorum queues count for us
        if not isinstance(count, int) or isinstance(count, bool):
            raw = headers.get("x-redeliveries", 0)
            count = (raw if isinstance(raw, int) and not isinstance(raw, bool) else 0) + 1
            if count <= self.settings.max_redeliveries:
                counted = self._counting[job_id] = asyncio.Event()
                try:
                    await session.settler.requeue_counted(
                        message, queue, name, job_id, prior, count
                    )
                finally:
                    self._counting.pop(job_id, None)
                    counted.set()
                log.warning("job_redelivered", job_id=job_id, job=name, queue=queue,
                            redeliveries=count, limit=self.settings.max_redeliveries)  # fmt: skip
                return True
        if count > self.settings.max_redeliveries:
            await self._dead_without_run(
                session, queue, message, name, job_id, "exhausted",
                f"delivered {count} times without a handler run finishing (the worker "
                f"crashed, was killed or lost its connection each time)",
                prior,
            )  # fmt: skip
            return True
        return False
