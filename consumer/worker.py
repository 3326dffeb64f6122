"""``Worker``: registrations, and ``run``/``stop`` around the sessions that consume.

A delivery reads top to bottom through modules named for each step; this class only wires them:

* ``session``    the two connections (consume + ack, publish outcome copies), reconnects, why a
                 session ended, graceful drain;
* ``pipeline``   one delivery: parse (``delivery``, ``producers.message.read_envelope``) →
                 redelivery guard (``redelivery``) → validate → chain → settle;
* ``middleware`` the chain every run passes, ``async def mw(ctx, call_next)``, outermost first
                 (the full order, with the layers only some jobs get, is in its docstring)::

                     log_context → [RateLimited] → [tracing] → JobMetrics →
                     @worker.middleware layers… → [JobScope] → [JobTimeout] → handler

                 built once per job at start; the handler's return value flows back out
                 through every layer to settle;
* ``execution``  the handler call (async on the loop, ``def`` on ``JobThreads``) and how a
                 run's result or exception is read;
* ``settle``     every outcome: its copies (``lifecycle`` builds the events and follow-ups)
                 confirmed through ``outbox`` → ack (``acker``) → metric → one log line.

Schedules (``Worker.schedule``) and resources are checked when the app has finished loading
(``check``: ``run`` and the CLI's app loader call it, so they may be declared before or after
their jobs). What runs beside the consume loop (health endpoint, status store, rate limiters,
the scheduler) is started by ``leveret.consumer.runtime.startup``; ``readiness`` is what ``/readyz``
reports.

The loop talks to aiormq's channels directly: aiormq already runs each delivery as its own
task, and skipping aio-pika's per-message wrapper is a large share of the per-job CPU. Prefetch
is the worker's concurrency: with one queue, the consumer's prefetch bounds the jobs held and
run at once, and nothing else limits it. With several queues each consumer may hold
``prefetch`` unacknowledged (any one queue can use all of it: a busy queue is not held to a
fraction while the others are empty), and the pipeline's worker-wide limit keeps at most
``prefetch`` running at once; a delivery beyond it waits for a free slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, TypeVar

import structlog
from prometheus_client import CollectorRegistry

from leveret.consumer.delivery.middleware import Middleware, check_middleware
from leveret.consumer.delivery.pipeline import Pipeline
from leveret.consumer.delivery.session import Session, consume
from leveret.consumer.features.cancellation import Cancellation
from leveret.consumer.features.resources import Plan as ResourcePlan
from leveret.consumer.features.resources import Resources, Scope
from leveret.consumer.features.schedules.spec import Schedule, check_schedules, make_schedule
from leveret.consumer.registry import (
    DEFAULT_BACKOFF,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_QUEUE,
    Backoff,
    Registry,
)
from leveret.consumer.runtime import startup
from leveret.consumer.runtime.metrics import Outcomes, WorkerMetrics
from leveret.consumer.runtime.readiness import Readiness
from leveret.consumer.runtime.threads import JobThreads
from leveret.consumer.settings import WorkerSettings
from leveret.topology.model import Topology

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=Middleware)

log = structlog.get_logger("leveret.worker")


class Worker:
    """Runs registered jobs from RabbitMQ; settings come from ``LEVERET_*``."""

    def __init__(
        self, settings: WorkerSettings | None = None, *, registry: CollectorRegistry | None = None
    ) -> None:
        self.settings = settings if settings is not None else WorkerSettings()
        self.jobs = Registry()
        self.middlewares: list[Middleware] = []
        self.schedules: list[Schedule] = []
        self.metrics = WorkerMetrics.for_registry(registry)
        self.resources = Resources(self.metrics.registry)
        # How each handler's parameters after the payload resolve: ``check`` fills it.
        self.plans: dict[str, ResourcePlan] = {}
        self._beside: startup.Beside | None = None  # while ``run`` runs
        self._stopping: asyncio.Event | None = None
        self._readiness = Readiness(self.metrics)
        self._pipeline: Pipeline | None = None
        self._outcomes = Outcomes(self.metrics)

    def job(
        self,
        name: str,
        *,
        queue: str = DEFAULT_QUEUE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        backoff: Backoff = DEFAULT_BACKOFF,
        timeout: float | None = None,
        cancellable: bool = False,
        rate_limit: str | None = None,
        global_rate_limit: str | None = None,
        lock: str | None = None,
        idempotency_key: str | None = None,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] | None = None,
    ) -> Callable[[F], F]:
        """Register a handler; the function is returned unchanged so tests can call it.

        Parameters after the payload are resolved by annotated type: ``JobContext`` or a
        ``@worker.resource``'s type (checked when the app has loaded, ``check``).
        ``rate_limit="N/s"`` (``/m``, ``/h``) caps starts per worker process,
        ``global_rate_limit`` across every worker (Redis when ``LEVERET_STATUS_URL`` is set, else
        the broker); a job over its limit waits or is given back for later, burning no attempt.
        ``cancellable`` is for ``async def`` handlers only (a thread cannot be stopped).
        ``lock="{customer_id}"``: runs whose key (a format string over the payload's fields) is
        equal never overlap across workers; ``idempotency_key="{order_id}"``: a run whose key
        already succeeded is skipped and returns the first result; ``retry_on=(...)``: only
        these exceptions retry, any other dead-letters ``rejected`` (docs/coordination.md).

        ``timeout`` cancels an ``async`` handler. A plain ``def`` handler cannot be stopped
        (Python has no way to stop a thread): at its timeout the worker stops waiting and
        retries or dead-letters the job, but the function runs on in its thread until it
        returns, possibly beside its own retry. The timeout counts from when a thread starts
        the job. See ``JobThreads`` and docs/reliability.md, "Limits".
        """

        def register(fn: F) -> F:
            self.jobs.add(
                fn,
                name,
                queue,
                max_attempts,
                backoff,
                timeout,
                cancellable=cancellable,
                rate_limit=rate_limit,
                global_rate_limit=global_rate_limit,
                lock=lock,
                idempotency_key=idempotency_key,
                retry_on=retry_on,
            )
            return fn

        return register

    def middleware(self, mw: M) -> M:
        """Register ``async def mw(ctx, call_next)`` around every run, first registered outermost;
        ``await call_next(ctx)`` returns the handler's result, and an exception a middleware
        raises or lets through is the run's outcome (see ``consumer.delivery.middleware``)."""
        self.middlewares.append(check_middleware(mw))
        return mw

    def resource(self, scope: Scope = "process") -> Callable[[F], F]:
        """Register a resource: ``scope="process"`` is opened at start and closed at shutdown,
        ``"job"`` per job and closed after it whatever the outcome (``Resources``). Handlers
        and other resources ask for it by its type (the return annotation; a generator's or
        context manager's yielded type)."""

        def register(fn: F) -> F:
            self.resources.add(fn, scope)
            return fn

        return register

    def schedule(
        self,
        job: str,
        *,
        cron: str | None = None,
        every: timedelta | float | None = None,
        tz: str = "UTC",
        payload: Mapping[str, Any] | None = None,
        name: str | None = None,
        missed: str = "once",
    ) -> Schedule:
        """Publish ``job`` with ``payload`` on a schedule: ``cron=`` (5 fields, or 6 with seconds
        first, read in ``tz``) or ``every=`` (seconds or a timedelta, aligned to the epoch).

        ``name`` (default: the job name) is unique per app and names each tick's job id,
        ``<name>@<tick as RFC 3339 UTC>``. ``missed="once"`` fires the most recent tick missed
        while no worker ran, ``"skip"`` none. A bad expression or time zone raises
        ``ConfigError`` here; an unregistered job or a duplicate name when the app has loaded
        (``check``), since jobs may be registered after their schedule.
        """
        schedule = make_schedule(
            job, cron=cron, every=every, tz=tz, payload=payload, name=name, missed=missed
        )
        self.schedules.append(schedule)
        return schedule

    def check(self) -> None:
        """What can only be checked once the whole app is loaded: every schedule names a
        registered job, no two share a name; every resource's dependencies exist without a
        cycle, and every handler parameter has a provider (``plans``). Raises ``ConfigError``."""
        check_schedules(self.schedules, self.jobs.jobs)
        self.resources.check()
        self.plans = {name: self.resources.plan(s.fn, name) for name, s in self.jobs.jobs.items()}

    @property
    def topology(self) -> Topology:
        return self.jobs.topology(self.settings.exchange, self.settings.queue_type)

    @property
    def ready(self) -> bool:
        """Connected to the broker, consuming, and able to start a plain ``def`` job."""
        return self._readiness.ready

    def stop(self) -> None:
        """Ask a running worker to shut down gracefully (what SIGTERM does)."""
        if self._stopping is not None:
            if self._stopping.is_set() and self._pipeline is not None:
                log.warning("second_stop_signal", action="giving up on in-flight jobs now")
                for task in list(self._pipeline.tasks):
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
        queues = self.jobs.select(queues)
        self.check()
        prefetch = prefetch or self.settings.prefetch
        share = prefetch  # per consumer; the pipeline bounds the total (module docstring)
        self._stopping = stopping = asyncio.Event()
        # Plain `def` handlers run here; as many threads as jobs may be held at once, never more
        # (a hung handler keeps its thread: see JobThreads).
        threads = JobThreads(prefetch)
        self._readiness.watch(threads)
        limiters = startup.global_limiters(self.settings)
        limiters.on_stalled = functools.partial(self._readiness.stall, "rate_limit_store")
        limits = startup.rate_limits(self.jobs, limiters, share)
        sleep = self._sleep_unless_stopped
        # Cancellation exists where the status store does (its marks live there).
        cancellation = Cancellation() if self.settings.status_url is not None else None
        self._pipeline = startup.pipeline(self, threads, limits, sleep, stopping, cancellation)
        if len(queues) > 1:
            self._pipeline.limit_running(prefetch)
        not_ready = functools.partial(self._readiness.set_connected, False)
        stalled = functools.partial(self._readiness.stall, "status_store")
        plan = startup.session_plan(
            self, self._pipeline, queues, share, self._outcomes, not_ready, stalled
        )
        startup.log_start(self, queues, prefetch, share)
        beside = self._beside = startup.Beside(queues, self.metrics)
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self._stopped)  # undone last: the final line
            if plan.status is not None:
                stack.push_async_callback(plan.status.store.close)
                stack.push_async_callback(plan.status.close)  # undone first: before the client
            stack.callback(threads.shutdown)
            stack.push_async_callback(limiters.close)
            # Process resources open now (a database that is down fails the start, not the
            # first job) and close after the last job drained.
            await stack.enter_async_context(self.resources.process_scope())
            stop = self.stop if handle_signals else None
            await beside.start(stack, self, stop)
            beside.doctor(stack, self)
            startup.start_scheduler(stack, self, lambda: self._readiness.connected, sleep, stopping)
            await consume(plan, sleep, stopping, self._on_session, self.stop)

    @property
    def health_port(self) -> int | None:
        """The port ``/metrics`` and ``/readyz`` listen on while ``run`` runs (``0`` picks one)."""
        return self._beside.health_port if self._beside is not None else None

    def _stopped(self) -> None:
        self._readiness.set_connected(False)
        log.info("worker_stopped", **self._outcomes.counts)

    def _on_session(self, session: Session | None) -> None:
        """A session started consuming (ready), or ended (``None``: not ready)."""
        self._readiness.set_connected(session is not None)
        if session is not None and self._beside is not None:
            self._beside.dlq_depth.attach(session.connection)

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        assert self._stopping is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
