"""What a running worker starts beside its consume loop, each piece undone by one exit stack.

``Worker.run`` reads as: build the pipeline, open what runs beside it (this module), consume.
The optional features plug in here rather than in the worker class, so adding one does not
grow the path a delivery takes:

* ``status_writer`` / ``cancel_marks``: with ``LEVERET_STATUS_URL``, the Redis store settle
  records each job's status in (``StatusWriter``), and the cancel marks on the same client
  (one per worker process);
* ``rate_limits``: a ``RateLimited`` chain layer per job that has a limit, the global ones on
  Redis (with a status store) or on the broker;
* ``start_beside``: health endpoint, signal handlers, the DLQ depth gauge and the start-up
  doctor checks (logged, never fatal);
* ``start_scheduler``: an app with schedules runs one ``Scheduler`` in every worker process,
  whatever queues it consumes; they elect one leader through the broker, which fires each
  tick once (``leveret.consumer.features.schedules.leader``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import SecretStr

from leveret.consumer.delivery.pipeline import Pipeline
from leveret.consumer.delivery.session import Plan
from leveret.consumer.delivery.status_writer import StatusWriter
from leveret.consumer.features.cancellation import Cancellation
from leveret.consumer.features.locks import Coordination, has_locks, require_redis, settings_of
from leveret.consumer.features.ratelimit.layer import RateLimited
from leveret.consumer.features.ratelimit.limiters import GlobalLimiters, LocalLimiter
from leveret.consumer.features.schedules.leader import Scheduler, with_heartbeat
from leveret.consumer.runtime.dlq_depth import DlqDepthRefresher
from leveret.consumer.runtime.health import HealthServer
from leveret.producers.broker import connect, mask_url

if TYPE_CHECKING:
    from leveret.consumer.registry import Registry
    from leveret.consumer.runtime.metrics import Outcomes, WorkerMetrics
    from leveret.consumer.runtime.threads import JobThreads
    from leveret.consumer.settings import WorkerSettings
    from leveret.consumer.worker import Worker
    from leveret.producers import ScheduleStore
    from leveret.producers.stores import StatusStore

log = structlog.get_logger("leveret.worker")


def pipeline(
    worker: Worker,
    threads: JobThreads,
    limits: dict[str, RateLimited],
    sleep: Callable[[float], Awaitable[None]],
    stopping: asyncio.Event,
    cancellation: Cancellation | None,
) -> Pipeline:
    """The worker's pipeline: one chain per job, composed now so no message pays for it."""
    from leveret.consumer.features.tracing import tracing_layer

    return Pipeline.for_jobs(
        worker.jobs,
        worker.middlewares,
        worker.metrics,
        threads,
        worker.settings,
        sleep,
        stopping,
        resources=worker.resources,
        plans=worker.plans,
        limits=limits,
        tracing=tracing_layer(),
        cancellation=cancellation,
        coordination=coordination(worker),
    )


def coordination(worker: Worker) -> Coordination | None:
    """Locks and done marks (``lock=``, ``idempotency_key=``, ``ctx.done_before``) live on the
    status store's Redis, attached when ``session_plan`` opens it; without it, ``lock=`` jobs
    lock on the broker (``broker_locks``) and ``idempotency_key=`` jobs refuse to start
    (``ConfigError``). With a status store, each job's layers start with the group layer: a
    group's final job runs once, with ``ctx.group`` (``features.groups.GroupCoordination``)."""
    require_redis(worker.jobs.jobs, worker.settings.status_url)
    if worker.settings.status_url is None:
        return broker_locks(worker) if has_locks(worker.jobs.jobs) else None
    from leveret.consumer.features.groups import GroupCoordination

    return GroupCoordination(settings_of(worker.settings))


def broker_locks(worker: Worker) -> Coordination:
    """Without ``LEVERET_STATUS_URL``, ``lock=`` jobs lock on the broker (``BrokerLocks``): a
    connection of their own, with a heartbeat the lock TTL asks for, opened on the first locked
    run and closed with the worker (``Beside.start``). No done marks: ``idempotency_key=``
    refused to start above, ``ctx.done_before`` says to set ``LEVERET_STATUS_URL``."""
    from leveret.consumer.features.broker_locks import BrokerLocks, lock_heartbeat, lock_url

    settings = worker.settings
    coordination = settings_of(settings)
    heartbeat = lock_heartbeat(coordination.lock_ttl)
    url = lock_url(settings.amqp_url.get_secret_value(), heartbeat)
    locking = settings.model_copy(update={"amqp_url": SecretStr(url)})
    locks = BrokerLocks(
        lambda: connect(locking, robust=False), settings.exchange, heartbeat_s=heartbeat
    )
    return Coordination(coordination, locks=locks)


def session_plan(
    worker: Worker,
    pipeline: Pipeline,
    queues: list[str],
    share: int,
    outcomes: Outcomes,
    on_lost: Callable[[], None],
    on_stalled: Callable[[bool], None],
) -> Plan:
    """What every session of one run consumes, with the optional stores it feeds."""
    status_store = open_status_store(worker.settings)
    status = None
    if status_store is not None:
        status = StatusWriter(
            status_store, timeout_s=worker.settings.status_timeout, on_stalled=on_stalled
        )
        if pipeline.coordination is not None:
            pipeline.coordination.attach(getattr(status_store, "client", None))
    return Plan(
        worker.settings,
        worker.topology,
        queues,
        share,
        outcomes,
        {},
        pipeline,
        on_lost,
        status=status,
        cancellation=pipeline.cancellation,
        **cancel_and_dedup(status_store),
    )


def log_start(worker: Worker, queues: list[str], prefetch: int, share: int) -> None:
    """The start line (the broker URL masked) and the per-queue prefetch gauge."""
    for q in queues:
        worker.metrics.prefetch.labels(queue=q).set(share)
    log.info(
        "worker_starting",
        broker=mask_url(worker.settings.amqp_url.get_secret_value()),
        queues=queues,
        prefetch=prefetch,
        prefetch_per_queue=share,
        jobs=sorted(worker.jobs.jobs),
        schedules=[s.name for s in worker.schedules],
    )


def open_status_store(settings: WorkerSettings) -> StatusStore | None:
    """With ``LEVERET_STATUS_URL``, the store settle records statuses in."""
    if settings.status_url is None:
        return None
    from leveret.producers.stores import RedisStatusStore

    url = settings.status_url.get_secret_value()
    return RedisStatusStore.from_url(url, ttl=settings.status_ttl)


def cancel_and_dedup(store: StatusStore | None) -> dict[str, Any]:
    """Cancel marks and de-duplication claims on the status store's Redis client (one client
    per worker process, ``Stores``); nothing without a Redis status store."""
    from leveret.producers.stores import Stores

    stores = Stores.of(store)
    if stores is None:
        return {}
    return {"cancel_marks": stores.marks, "dedup": stores.dedup}


def global_limiters(settings: WorkerSettings) -> GlobalLimiters:
    """Global rate limits live on Redis when there is a status store, else on the broker."""
    status = settings.status_url.get_secret_value() if settings.status_url else None
    return GlobalLimiters(
        settings.exchange,
        status,
        lambda: connect(settings),
        status_timeout=settings.status_timeout,
    )


def rate_limits(jobs: Registry, limiters: GlobalLimiters, share: int) -> dict[str, RateLimited]:
    """A ``RateLimited`` layer per limited job; half a consumer's prefetch may wait."""
    limits = {}
    for spec in jobs.jobs.values():
        if spec.rate_limit is None and spec.global_rate_limit is None:
            continue
        local = LocalLimiter(spec.rate_limit) if spec.rate_limit is not None else None
        shared = (
            limiters.for_job(spec.name, spec.global_rate_limit)
            if spec.global_rate_limit is not None
            else None
        )
        limits[spec.name] = RateLimited(local, shared, max_waiting=share // 2)
    return limits


class Beside:
    """Health endpoint, signal handlers, the DLQ depth gauge and the start-up doctor run beside
    the loop; ``start`` registers each one's undoing on the worker's exit stack."""

    def __init__(self, queues: list[str], metrics: WorkerMetrics) -> None:
        self.dlq_depth = DlqDepthRefresher(queues, metrics.dlq_messages)
        self.health_port: int | None = None

    async def start(
        self, stack: contextlib.AsyncExitStack, worker: Worker, stop: Callable[[], None] | None
    ) -> None:
        """``stop`` is the signal handler, when the worker handles signals."""
        settings = worker.settings
        if settings.metrics_port:
            registry = worker.metrics.registry
            health = HealthServer(
                settings.metrics_host, settings.metrics_port, registry, lambda: worker.ready
            )
            await health.start()
            self.health_port = health.port
            stack.push_async_callback(health.stop)
        if stop is not None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop)
                stack.callback(loop.remove_signal_handler, sig)
        self.dlq_depth.start()
        stack.push_async_callback(self.dlq_depth.stop)
        # The broker lock store's connection (no status store), once the last run ended.
        coordination = worker._pipeline.coordination if worker._pipeline is not None else None
        if coordination is not None:
            stack.push_async_callback(coordination.close)

    @staticmethod
    def doctor(stack: contextlib.AsyncExitStack, worker: Worker) -> None:
        """Operator checks at start: findings are logged, a failing check never stops a worker.
        Imported here, so a worker loads the operator tools only once it runs."""
        from leveret.consumer.ops.doctor import log_findings

        task = asyncio.create_task(log_findings(worker.settings, worker.jobs, worker.topology))
        stack.callback(task.cancel)


def start_scheduler(
    stack: contextlib.AsyncExitStack,
    worker: Worker,
    declared: Callable[[], bool],
    sleep: Callable[[float], Awaitable[None]],
    stopping: asyncio.Event,
) -> None:
    """Take part in firing the app's schedules until the worker stops.

    It starts once the worker's first session has declared the topology (``declared``), opens
    its own plain connection (``connect`` honours every node of ``LEVERET_AMQP_URL`` and TLS)
    and reconnects by itself. It stops as soon as the worker is asked to stop, not after the
    in-flight jobs drained: a leader that is leaving hands over at once (its last heartbeat
    tells the successor that nothing was missed). Nothing for an app without schedules.
    """
    # Runtime schedules (``producers.schedules``, with LEVERET_STATUS_URL): an app without
    # schedules of its own starts its scheduler once the first one is added.
    runtime = runtime_schedule_store(worker.settings)
    if not worker.schedules and runtime is None:
        return
    # A short AMQP heartbeat on every node's URL: a leader whose host vanishes without closing
    # its socket is noticed by the broker in ~2 s, so a standby takes over within 5 s.
    urls = worker.settings.amqp_url.get_secret_value().split(",")
    beating = ",".join(with_heartbeat(u.strip()) for u in urls if u.strip())
    settings = worker.settings.model_copy(update={"amqp_url": SecretStr(beating)})
    scheduler = Scheduler(
        lambda: connect(settings, robust=False),
        worker.schedules,
        exchange=settings.exchange,
        registry=worker.metrics.registry,
        publish_timeout=settings.publish_timeout,
        queue_type=settings.queue_type,
        runtime=runtime,
    )

    async def run_once_declared() -> None:
        # A tick fired before the topology is declared would find no queue bound for its job
        # (unroutable) and be lost. Polled, so the consume path stays untouched; 50 ms once.
        while not declared() and not stopping.is_set():
            await sleep(0.05)
        while not worker.schedules and runtime is not None and not stopping.is_set():
            with contextlib.suppress(Exception):
                if await runtime.list():
                    break
            await sleep(2.0)
        if not stopping.is_set():
            await scheduler.run()

    async def stop_when_stopping() -> None:
        await stopping.wait()
        scheduler.stop()

    task = asyncio.create_task(run_once_declared(), name="leveret-scheduler")
    watcher = asyncio.create_task(stop_when_stopping())

    async def wind_down() -> None:
        watcher.cancel()
        scheduler.stop()
        try:
            await asyncio.wait_for(task, 10)
        except TimeoutError:
            log.warning("scheduler_stop_timeout", scheduler=scheduler.app)
        if runtime is not None:
            with contextlib.suppress(Exception):
                await runtime.close()

    stack.push_async_callback(wind_down)


def runtime_schedule_store(settings: WorkerSettings) -> ScheduleStore | None:
    """With ``LEVERET_STATUS_URL``: the app's runtime schedules (its own Redis client)."""
    if settings.status_url is None:
        return None
    from leveret.producers import ScheduleStore

    return ScheduleStore.from_url(settings.status_url.get_secret_value(), settings.exchange)
