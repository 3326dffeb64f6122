"""One delivery, top to bottom: parse → guard → validate → chain → handler → settle → ack.

``Pipeline.on_message`` is the consumer callback (aiormq runs each delivery as its own task).
It reads the envelope once into a ``Delivery``, then ``_process`` walks it down:

1. an invalid envelope, an unknown job, a redelivery the guard settles, a job past its
   ``x-expires-at`` (``publish(..., expires=)``: dead, ``expired``) or a payload that fails
   validation ends in settle at once (``dead_without_run``/``requeue_counted``);
2. otherwise a ``JobContext`` is built (with the settler behind ``ctx.progress`` and
   ``ctx.enqueue``), the queue wait is observed on a first run, ``started`` is sent (best effort,
   ``LEVERET_EVENTS=all``) and the job's chain runs (``middleware``; composed once per job when
   the worker starts); its result or exception comes back here;
3. settle owns the outcome: it publishes any copy, the outcome event and the run's follow-ups,
   waits for all their confirms, acks, counts and logs (``settle``).

Whatever escapes that (a copy not confirmed, a failing log sink) still leaves the job with
exactly one outcome: it is given back after a backoff (``Settler.give_back_later``). A
cancellation (shutdown grace over, or the session lost) gives it back unburnt.

Features that decide a run's outcome themselves (cancellation, rate limits) are layers of the
chain and raise a ``DecidedOutcome`` (``outcomes``), which this module hands to its ``settle``
like any other outcome: the delivery path has no special case per feature.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiormq.abc
import structlog
from prometheus_client import Histogram
from pydantic import ValidationError

from leveret.consumer.context import JobContext
from leveret.consumer.delivery import execution
from leveret.consumer.delivery.envelope import Delivery
from leveret.consumer.delivery.middleware import CallNext, JobMetrics, Middleware
from leveret.consumer.delivery.outbox import CopyInvalid
from leveret.consumer.delivery.outcomes import DecidedOutcome
from leveret.consumer.delivery.redelivery import RedeliveryGuard
from leveret.consumer.delivery.settle import Settler
from leveret.consumer.features.cancellation import Cancellation
from leveret.consumer.features.locks import Coordination
from leveret.consumer.features.ratelimit.layer import RateLimited
from leveret.consumer.features.resources import Plan, Resources
from leveret.consumer.registry import JobSpec, Registry
from leveret.consumer.runtime.metrics import UNKNOWN_JOB, WorkerMetrics
from leveret.consumer.runtime.threads import JobThreads
from leveret.consumer.settings import WorkerSettings
from leveret.producers.wire import (
    HEADER_EXPIRES_AT,
    HEADER_PUBLISHED_AT,
    OWN_HEADERS,
    one_line,
)

log = structlog.get_logger("leveret.worker")


def _invalid_payload(exc: Exception) -> str:
    """A validation failure as one short line for ``x-error``."""
    if not isinstance(exc, ValidationError):
        return f"{type(exc).__name__}: {exc}"  # whatever the validation raises: invalid
    first: Any = exc.errors()[0] if exc.error_count() else {}
    where = ".".join(str(p) for p in first.get("loc", ())) or "body"
    return f"ValidationError: {exc.error_count()} error(s); {where}: {first.get('msg', exc)}"


def _queue_wait(headers: dict[str, Any] | None, timestamp: datetime | None) -> float | None:
    """Seconds since the job was published: ``x-published-at`` (ms) if the publisher set it,
    else the AMQP ``timestamp`` (whole seconds), else unknown. Clock skew never goes below 0."""
    published_ms = headers.get(HEADER_PUBLISHED_AT) if headers else None
    if isinstance(published_ms, int) and not isinstance(published_ms, bool):
        return max(time.time() - published_ms / 1000, 0.0)
    if timestamp is not None:
        return max(time.time() - timestamp.timestamp(), 0.0)
    return None


# Leveret's bookkeeping, never the publisher's: stripped copies' headers, plus the two that ride
# along on purpose (the per-job attempt cap, the publish time for the queue-wait metric).
_NOT_USER = OWN_HEADERS | {"x-max-attempts", "x-published-at", HEADER_EXPIRES_AT}


def _expired(headers: dict[str, Any] | None) -> str | None:
    """``x-expires-at`` passed (``publish(..., expires=)``): why the job is not run; else None.
    A header that is not an integer is ignored (it is no deadline Leveret wrote)."""
    at = headers.get(HEADER_EXPIRES_AT) if headers else None
    if not isinstance(at, int) or isinstance(at, bool) or time.time() * 1000 < at:
        return None
    when = datetime.fromtimestamp(at / 1000, UTC).isoformat(timespec="milliseconds")
    return f"expired at {when} before it started"


def user_headers(headers: dict[str, Any] | None) -> dict[str, str]:
    """The AMQP headers a publisher set, as ``ctx.headers`` shows them: str values, none of
    Leveret's own bookkeeping (``x-attempts`` and the like: ``ctx.attempt`` says that)."""
    if not headers:
        return {}
    return {
        k: v if type(v) is str else v.decode() if isinstance(v, bytes) else str(v)
        for k, v in headers.items()
        if k not in _NOT_USER
    }


@dataclass(eq=False)
class Pipeline:
    """Runs deliveries for one worker; the chains are built once, per job (``for_jobs``)."""

    _jobs: dict[str, JobSpec]
    _chains: dict[str, CallNext]
    _guard: RedeliveryGuard
    _max_body: int
    _sleep: Callable[[float], Awaitable[None]]  # returns early once the worker stops
    _stopping: asyncio.Event
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)  # deliveries in flight
    # Those whose run is over and whose outcome is being settled: their copies may be on the
    # wire, so a shutdown waits for them rather than give them back (a second live copy).
    settling: set[asyncio.Task[Any]] = field(default_factory=set)
    # job name -> its queue-wait histogram child, resolved once.
    _waits: dict[str, Histogram] = field(default_factory=dict)
    # The chain's cancellation layer (with a status store): its ids, its cancel callback.
    cancellation: Cancellation | None = None
    # With several queues, at most this many deliveries are processed at once (the worker's
    # prefetch; each queue's consumer may hold that many): ``limit_running``.
    _slots: asyncio.Semaphore | None = None
    # ``lock=``/``idempotency_key=`` and ``ctx.done_before``: the worker's lock store and done
    # marks (``features.locks.Coordination``), with Redis.
    coordination: Coordination | None = None

    def limit_running(self, most: int) -> None:
        """Run at most ``most`` deliveries at once, whichever queues they come from."""
        self._slots = asyncio.Semaphore(most)

    @property
    def jobs(self) -> Mapping[str, JobSpec]:
        return self._jobs

    @classmethod
    def for_jobs(
        cls,
        registry: Registry,
        middlewares: Sequence[Middleware],
        metrics: WorkerMetrics,
        threads: JobThreads,
        settings: WorkerSettings,
        sleep: Callable[[float], Awaitable[None]],
        stopping: asyncio.Event,
        *,
        resources: Resources | None = None,
        plans: dict[str, Plan] | None = None,
        limits: dict[str, RateLimited] | None = None,
        tracing: Middleware | None = None,
        cancellation: Cancellation | None = None,
        coordination: Coordination | None = None,
    ) -> Pipeline:
        """One chain per job, composed now so no message pays for it."""
        chains = {}
        waits = {}
        plans, limits = plans or {}, limits or {}
        for spec in registry.jobs.values():
            waits[spec.name] = metrics.queue_wait.labels(queue=spec.queue, job_name=spec.name)
            started = metrics.started.labels(queue=spec.queue, job_name=spec.name)
            layer = JobMetrics(started, metrics.in_progress.labels(queue=spec.queue))
            chains[spec.name] = execution.build_chain(
                spec,
                middlewares,
                layer,
                threads,
                plan=plans.get(spec.name),
                resources=resources,
                rate_limited=limits.get(spec.name),
                tracing=tracing,
                cancellation=cancellation,
                coordination=(
                    coordination.layers(spec, max(1, settings.prefetch // 2))
                    if coordination is not None
                    else ()
                ),
            )
        guard = RedeliveryGuard(settings.max_redeliveries)
        return cls(
            registry.jobs,
            chains,
            guard,
            settings.max_body_bytes,
            sleep,
            stopping,
            _waits=waits,
            cancellation=cancellation,
            coordination=coordination,
        )

    def start(
        self,
        settler: Settler,
        lost: asyncio.Event,
        queue: str,
        message: aiormq.abc.DeliveredMessage,
    ) -> None:
        """The consumer callback where the channel delivers directly
        (``producers.broker.frames.deliver_directly``): the delivery's task, made here."""
        task = asyncio.get_running_loop().create_task(
            self.on_message(settler, lost, queue, message)
        )
        self.tasks.add(task)  # from now on: a channel closing before its first step cancels it

    async def on_message(
        self,
        settler: Settler,
        lost: asyncio.Event,
        queue: str,
        message: aiormq.abc.DeliveredMessage,
    ) -> None:
        d = Delivery.read(message, queue, self._max_body)
        settler.acker.track(d.tag)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            try:
                if self._slots is None:
                    await self._process(d, settler, task)
                else:
                    async with self._slots:
                        await self._process(d, settler, task)
            except asyncio.CancelledError:
                await self._cancelled(d, settler, lost)
            except Exception as exc:
                await self._escaped(d, settler, lost, exc)
        finally:
            self.tasks.discard(task)
            self.settling.discard(task)

    async def _process(self, d: Delivery, settler: Settler, task: asyncio.Task[Any]) -> None:
        if d.id_assigned:
            _log_assigned_id(d)
        spec = self._jobs.get(d.name)
        if d.problem is not None:
            label = d.name if spec is not None else UNKNOWN_JOB
            return await settler.dead_without_run(d, label, "invalid", d.problem, 0)
        if spec is None:
            why = f"no handler for job {d.name!r} on queue {d.queue!r}"
            return await settler.dead_without_run(d, UNKNOWN_JOB, "unknown_job", why, d.attempts)
        await self._guard.wait_if_counting(d.job_id)
        if d.redelivered:  # counted and put back, or dead-lettered: it runs from its copy
            return await self._guard.settle(d, settler, spec.name)
        if (expired := _expired(d.properties.headers)) is not None:
            return await settler.dead_without_run(d, spec.name, "expired", expired, d.attempts)
        try:
            payload = spec.validate(d.message.body)
        except Exception as exc:
            return await settler.dead_without_run(
                d, spec.name, "invalid", _invalid_payload(exc), d.attempts
            )
        ctx = self._context(d, spec, payload, settler)
        started = time.perf_counter()
        result, error = await execution.run(self._chains[spec.name], ctx)
        duration = time.perf_counter() - started
        self.settling.add(task)
        if error is None:
            return await settler.succeeded(
                d, spec.name, duration, result, ctx.attempt, ctx.follow_ups, ctx.before_ack
            )
        if ctx.follow_ups:  # never published: free the keys they claimed
            settler.release_follow_ups(ctx.follow_ups)
        if isinstance(error, DecidedOutcome):  # a layer decided it (outcomes)
            return await error.settle(settler, d, spec.name, ctx.attempt, duration)
        return await settler.failed(d, spec, ctx.attempt, error, duration)

    def _context(self, d: Delivery, spec: JobSpec, payload: Any, settler: Settler) -> JobContext:
        """The run's ``ctx``; a first delivery's queue wait is observed here, once."""
        props = d.properties
        ctx = JobContext(
            d.job_id,
            spec.name,
            d.queue,
            d.attempts + 1,
            spec.max_attempts if d.max_attempts is None else d.max_attempts,
            log,
            d.redelivered,
            props.priority,
            user_headers(props.headers),
            payload,
        )
        ctx.lifecycle = settler
        ctx.delivery = d
        ctx.done_marks = self.coordination
        if d.attempts == 0:
            wait = _queue_wait(props.headers, props.timestamp)
            if wait is not None:
                self._waits[spec.name].observe(wait)
        return ctx

    async def _cancelled(self, d: Delivery, settler: Settler, lost: asyncio.Event) -> None:
        """Shutdown grace ran out: give the job back unburnt. Cancelled because the channel
        went away (aiormq cancels consumers before our ``lost`` flag is set, e.g. when the
        broker's consumer_timeout closes the channel): publish nothing, or the broker's own
        redelivery would double the job. Cancelled while settling (the session waited for it
        past the grace; its copies may be out): nothing more is published, the job is
        requeued as it is unless it was acked already (a duplicate at worst)."""
        if settler.acker.settled(d.tag):
            return
        task = asyncio.current_task()
        if task in self.settling:
            if not lost.is_set():
                with contextlib.suppress(Exception):
                    await settler.acker.nack(d.tag, requeue=True)
            return
        if self._stopping.is_set() and not lost.is_set() and not settler.acker.closed:
            try:
                await settler.give_back(d)
            except Exception:
                with contextlib.suppress(Exception):
                    await settler.acker.nack(d.tag, requeue=True)
        elif not lost.is_set():
            with contextlib.suppress(Exception):
                await settler.acker.nack(d.tag, requeue=True)

    async def _escaped(
        self, d: Delivery, settler: Settler, lost: asyncio.Event, exc: Exception
    ) -> None:
        """SettleFailed, or anything unexpected on the way (a log call, a metric): the job
        still gets exactly one outcome. If it was settled already there is nothing to do."""
        if isinstance(exc, CopyInvalid) and not lost.is_set():
            # Sending the same copy again cannot help: dead-letter it, stripped to what AMQP
            # can carry (a failure there gives it back after the backoff, as below).
            try:
                return await settler.dead_uncopyable(d, exc)
            except Exception as again:
                exc = again
        if not settler.acker.settled(d.tag):
            await settler.give_back_later(d, exc, self._sleep, lost)
        else:
            with contextlib.suppress(Exception):
                log.error(
                    "job_error_after_settle",
                    job_id=d.job_id,
                    queue=d.queue,
                    error=one_line(f"{type(exc).__name__}: {exc}"),
                )


def _log_assigned_id(d: Delivery) -> None:
    """Informational: a failing log sink must not keep the job from running (its id is new on
    every delivery, so a give-back could never back off either)."""
    with contextlib.suppress(Exception):
        log.warning(
            "job_id_assigned",
            job_id=d.job_id,
            queue=d.queue,
            reason="message arrived without message_id",
        )
