"""Worker metrics, built in one place on a given registry so tests can use a fresh one."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from leveret.producers import built_on, per_registry, published_counter

# Jobs range from milliseconds to hours.
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 900.0, 3600.0,
)  # fmt: skip

# How long jobs wait in the queue, from publish to the start of their first run.
QUEUE_WAIT_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0, 21600.0, 86400.0,
)  # fmt: skip

SUCCEEDED = "succeeded"
RETRIED = "retried"
DEAD_LETTERED = "dead_lettered"
# Reserved for cancellation: its series exist (at 0) from the first job, so dashboards and
# alerts written against it work before any job is ever cancelled.
CANCELLED = "cancelled"
UNKNOWN_JOB = "unknown"


class WorkerMetrics:
    """One set per registry; ``for_registry`` shares it between workers of one process."""

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None = None) -> WorkerMetrics:
        return per_registry(registry or REGISTRY, cls)

    @classmethod
    def built_on(cls, registry: CollectorRegistry) -> WorkerMetrics | None:
        """The set ``for_registry`` built on ``registry``, if any (builds none)."""
        return built_on(registry, cls)

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # Gauges say how to combine the processes of ``leveret worker --processes N`` (see
        # consumer/runtime/supervisor.py: prometheus-client's multiprocess mode): held jobs and
        # concurrency add up, ready is the least ready process, a DLQ depth is the same queue
        # seen by each. Without PROMETHEUS_MULTIPROC_DIR the mode is ignored.
        registry = registry or REGISTRY
        self.registry = registry
        # The broker node the worker consumes from, masked (set by each session): /readyz names
        # it, so an operator sees which node of a cluster a worker failed over to.
        self.node: str | None = None
        self._job_series(registry)
        self._worker_series(registry)
        # So a process that both works and publishes exposes one published counter.
        self.published = published_counter(registry)

    def _job_series(self, registry: CollectorRegistry) -> None:
        """Per job: runs started and completed, run time, time queued."""
        self.started = Counter(
            "leveret_jobs_started_total",
            "Handler runs started.",
            ["queue", "job_name"],
            registry=registry,
        )
        self.completed = Counter(
            "leveret_jobs_completed_total",
            "Handler runs (and messages no handler could take) by outcome.",
            ["queue", "job_name", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "leveret_job_duration_seconds",
            "Handler run time.",
            ["queue", "job_name"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "leveret_job_queue_wait_seconds",
            "Time from publish to the start of a job's first run (retries are not counted; a "
            "delayed publish includes its delay). Read from the x-published-at header (ms), "
            "else the AMQP timestamp property, which has whole seconds only.",
            ["queue", "job_name"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=registry,
        )

    def _worker_series(self, registry: CollectorRegistry) -> None:
        """Per worker: what it holds and runs now, whether it is ready, what it could not settle."""
        self.in_progress = Gauge(
            "leveret_jobs_in_progress",
            "Jobs being handled right now.",
            ["queue"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.prefetch = Gauge(
            "leveret_worker_prefetch",
            "The most jobs this worker holds at once (its concurrency), per consumed queue.",
            ["queue"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.connected = Gauge(
            "leveret_worker_ready",
            "1 while the worker is connected and consuming, else 0.",
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.dlq_messages = Gauge(
            "leveret_dlq_messages",
            "Messages waiting in the queue's DLQ.",
            ["queue"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.settle_failures = Counter(
            "leveret_settle_failures_total",
            "Outcome copies (retry, DLQ, give-back) the broker did not confirm; the job was "
            "given back after a backoff and will run again.",
            ["queue"],
            registry=registry,
        )
        self.threads_stuck = Gauge(
            "leveret_job_threads_stuck",
            "Threads still running a plain `def` job that already timed out.",
            registry=registry,
            multiprocess_mode="livesum",
        )


@dataclass(slots=True)
class OutcomeChildren:
    """The outcome counters and duration of one (queue, job): resolved once, not per message."""

    succeeded: Counter
    retried: Counter
    dead_lettered: Counter
    cancelled: Counter
    duration: Histogram


@dataclass(eq=False)
class Outcomes:
    """Outcome metrics of one worker, and its totals for the ``worker_stopped`` line."""

    metrics: WorkerMetrics
    counts: dict[str, int] = field(
        default_factory=lambda: {SUCCEEDED: 0, RETRIED: 0, DEAD_LETTERED: 0, CANCELLED: 0}
    )
    _children: dict[tuple[str, str], OutcomeChildren] = field(default_factory=dict)

    def children(self, queue: str, job: str) -> OutcomeChildren:
        children = self._children.get((queue, job))
        if children is None:
            m, labels = self.metrics, {"queue": queue, "job_name": job}
            children = self._children[(queue, job)] = OutcomeChildren(
                succeeded=m.completed.labels(**labels, outcome=SUCCEEDED),
                retried=m.completed.labels(**labels, outcome=RETRIED),
                dead_lettered=m.completed.labels(**labels, outcome=DEAD_LETTERED),
                cancelled=m.completed.labels(**labels, outcome=CANCELLED),
                duration=m.duration.labels(**labels),
            )
        return children
