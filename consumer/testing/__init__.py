"""``leveret.testing``: run your jobs in your own tests, without a broker or with a real one.

* ``run_job(worker, "charge", payload, overrides={Session: fake})`` runs one handler in-process
  exactly as a worker would (a real ``JobContext``, resolved resources, your middleware, the
  job's timeout) and returns its result or raises what it raised.
* ``TestBroker(worker)`` runs published jobs in memory: retries without waiting out the backoff
  (the delay that would have been waited is kept in ``retries``), follow-ups from
  ``ctx.enqueue``, and dead-lettering with the reason in ``dead``.
* the pytest plugin (``leveret.testing.pytest_plugin``, registered through the ``pytest11``
  entry point): a ``leveret_amqp_url`` fixture, a fresh vhost on a real broker per test.

What the in-memory kit leaves out, on purpose: rate limits (a test should not wait for a
window to pass), prefetch and concurrency (jobs run one after another, in publish order,
retries at the back: deterministic), and the wire's redelivery guard. It shares everything else
with the worker: ``execution.build_chain`` composes the same chain, ``JobSpec.validate`` reads the
payload from the same JSON bytes a publisher sends, ``JobSpec.delay_after`` computes the retry
delay, and ``Resources`` opens the same resources (lazily, so an overridden session never opens
the real pool behind it).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, cast

import structlog
from pydantic import BaseModel

from leveret.consumer.context import JobContext
from leveret.consumer.delivery import execution
from leveret.consumer.delivery.middleware import CallNext, JobMetrics
from leveret.consumer.delivery.outcomes import DecidedOutcome
from leveret.consumer.delivery.pipeline import _invalid_payload
from leveret.consumer.errors import Reject
from leveret.consumer.errors import Retry as RetryAfter
from leveret.consumer.features.groups import MemoryGroups
from leveret.consumer.features.idempotency import MemoryDoneMarks
from leveret.consumer.features.locks import DEFAULT_LOCK_TTL_S, MemoryLocks, coordination_layers
from leveret.consumer.features.tracing import tracing_layer
from leveret.consumer.registry import JobSpec
from leveret.consumer.runtime.threads import JobThreads
from leveret.consumer.worker import Worker
from leveret.producers.wire import (
    HEADER_EXPIRES_AT,
    encode_payload,
    expires_header,
    new_job_id,
    one_line,
)

__all__ = ["DeadJob", "Enqueued", "Retry", "SucceededJob", "TestBroker", "run_job"]

log = structlog.get_logger("leveret.testing")


class _NoMetric:
    """Stands in for the worker's Prometheus children: tests count nothing."""

    def inc(self, amount: float = 1) -> None:
        pass

    def dec(self, amount: float = 1) -> None:
        pass


_NO_METRICS = JobMetrics(cast(Any, _NoMetric()), cast(Any, _NoMetric()))


@dataclass(frozen=True)
class Enqueued:
    """A follow-up job a handler enqueued with ``ctx.enqueue``."""

    job: str
    job_id: str
    payload: Any
    headers: dict[str, str]
    options: dict[str, Any]

    @property
    def copy(self) -> Enqueued:
        """What ``ctx.enqueue`` keeps as the run's follow-up: this record itself."""
        return self


@dataclass(frozen=True)
class DeadJob:
    """A job ``TestBroker`` dead-lettered: ``reason`` is ``exhausted``, ``rejected``,
    ``invalid`` or ``unknown_job``, as ``x-reason`` would say on a real DLQ."""

    job: str
    job_id: str
    payload: Any
    reason: str
    error: str
    attempts: int


@dataclass(frozen=True)
class SucceededJob:
    job: str
    job_id: str
    result: Any
    attempts: int


@dataclass(frozen=True)
class Retry:
    """A retry ``TestBroker`` ran at once instead of after ``delay_s``."""

    job: str
    job_id: str
    attempt: int  # the attempt that failed
    delay_s: float
    error: str


class _Collect:
    """``ctx.enqueue``/``ctx.progress`` outside a worker: follow-ups are collected, not sent."""

    records_started = False  # no status, no events: nothing to record as a run starts

    def __init__(self) -> None:
        self.progress_reports: list[tuple[str, float, str | None]] = []

    def started(self, d: Any, job: str, attempt: int) -> None:
        """Never called (``records_started`` is false)."""

    async def progress(
        self, d: Any, job: str, attempt: int, fraction: float, message: str | None
    ) -> None:
        self.progress_reports.append((job, fraction, message))

    async def follow_up(self, job: str, payload: Any, options: dict[str, Any]) -> Enqueued:
        options = dict(options)
        headers = {str(k): str(v) for k, v in (options.pop("headers", None) or {}).items()}
        job_id = options.pop("job_id", None) or new_job_id()
        return Enqueued(job, job_id, payload, headers, options)


def _body(payload: Any) -> bytes:
    """The JSON bytes a publisher would send for ``payload`` (a model, a dict, or bytes)."""
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if isinstance(payload, BaseModel | dict):
        return encode_payload(payload)
    raise TypeError(f"a payload is a pydantic model, a dict or JSON bytes, got {payload!r}")


def _spec(worker: Worker, job: str) -> JobSpec:
    try:
        return worker.jobs.jobs[job]
    except KeyError:
        known = ", ".join(sorted(worker.jobs.jobs)) or "none"
        raise LookupError(f"no job {job!r} is registered on this worker (has: {known})") from None


def _chain(
    worker: Worker, spec: JobSpec, threads: JobThreads, memory: _Memory | None = None
) -> CallNext:
    memory = memory if memory is not None else _Memory()
    return execution.build_chain(
        spec,
        worker.middlewares,
        _NO_METRICS,
        threads,
        plan=worker.plans[spec.name],
        resources=worker.resources,
        tracing=tracing_layer(),
        coordination=coordination_layers(
            spec, memory.locks, memory.marks, DEFAULT_LOCK_TTL_S, max_waiting=1
        ),
    )


@dataclass
class _Memory:
    """Locks and done marks in memory (``lock=``, ``idempotency_key=``, ``ctx.done_before``):
    jobs run one at a time here, so a lock never waits; it still sets ``ctx.lock_token``."""

    locks: MemoryLocks = field(default_factory=MemoryLocks)
    marks: MemoryDoneMarks = field(default_factory=MemoryDoneMarks)


def _context(
    spec: JobSpec,
    job_id: str,
    attempt: int,
    headers: Mapping[str, str] | None,
    payload: Any,
    lifecycle: _Collect,
) -> JobContext:
    ctx = JobContext(
        job_id,
        spec.name,
        spec.queue,
        attempt,
        spec.max_attempts,
        log.bind(job_id=job_id, job=spec.name),
        headers={str(k): str(v) for k, v in (headers or {}).items()},
        payload=payload,
    )
    ctx.lifecycle = lifecycle
    return ctx


async def run_job(
    worker: Worker,
    job: str,
    payload: Any,
    *,
    overrides: Mapping[Any, Any] | None = None,
    attempt: int = 1,
    headers: Mapping[str, str] | None = None,
    job_id: str | None = None,
    enqueued: list[Enqueued] | None = None,
) -> Any:
    """Run one handler of ``worker`` as a worker would, with no broker; return its result or
    raise what the run raised (after its job-scoped resources closed).

    ``overrides`` (``{Type: instance}``) stand in for resources of either scope: an overridden
    resource is never opened, nor what only it needed. Process resources the run needs are
    opened for this call and closed after it. ``attempt`` sets ``ctx.attempt`` (test
    ``ctx.is_last_attempt`` paths); jobs the handler enqueues are appended to ``enqueued``.
    """
    worker.check()
    spec = _spec(worker, job)
    value = spec.validate(_body(payload))
    collect = _Collect()
    ctx = _context(spec, job_id or new_job_id(), attempt, headers, value, collect)
    memory = _Memory()
    ctx.done_marks = memory.marks
    threads = JobThreads(1)
    try:
        chain = _chain(worker, spec, threads, memory)
        async with worker.resources.process_scope(eager=False, overrides=overrides):
            result, error = await execution.run(chain, ctx)
    finally:
        threads.shutdown()
    if enqueued is not None and ctx.follow_ups:
        enqueued.extend(ctx.follow_ups)
    if error is not None:
        raise error
    for step in ctx.before_ack or ():  # what settle runs once the follow-ups are out
        await step()
    return result


@dataclass
class _Pending:
    job: str
    job_id: str
    body: bytes
    headers: dict[str, str]
    attempts: int = 0  # runs so far
    max_attempts: int | None = None
    expires_at_ms: int | None = None  # publish(..., expires=)


@dataclass
class TestBroker:
    """An in-memory broker for ``worker``'s jobs: ``async with TestBroker(worker) as broker:``.

    ``publish`` queues a job, ``join`` runs everything queued until nothing is left (retries
    and follow-ups included, retries immediately), then ``succeeded``, ``dead``, ``retries`` and
    ``enqueued`` say what happened. Process resources are opened lazily inside the block and
    closed when it ends; ``overrides`` replace resources as in ``run_job``.
    """

    __test__ = False  # a class named Test* is not a pytest test class

    worker: Worker
    overrides: Mapping[Any, Any] | None = None
    max_runs: int = 10_000  # a guard against a job that enqueues itself forever
    succeeded: list[SucceededJob] = field(default_factory=list)
    dead: list[DeadJob] = field(default_factory=list)
    retries: list[Retry] = field(default_factory=list)
    enqueued: list[Enqueued] = field(default_factory=list)
    _queue: deque[_Pending] = field(default_factory=deque)
    _chains: dict[str, CallNext] = field(default_factory=dict)
    # Locks and done marks of this broker's jobs (``ctx.done_before`` works here too).
    memory: _Memory = field(default_factory=_Memory)
    postponed: int = 0  # runs a layer gave back (a lock held): requeued, no attempt burnt
    _stack: contextlib.AsyncExitStack | None = None
    # ``group``: members counted in memory, the final job queued once all ended.
    groups: MemoryGroups = field(default_factory=MemoryGroups)

    async def __aenter__(self) -> TestBroker:
        self.worker.check()
        stack = contextlib.AsyncExitStack()
        threads = JobThreads(4)
        stack.callback(threads.shutdown)
        try:
            self._chains = {
                name: _chain(self.worker, spec, threads, self.memory)
                for name, spec in self.worker.jobs.jobs.items()
            }
            await stack.enter_async_context(
                self.worker.resources.process_scope(eager=False, overrides=self.overrides)
            )
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()

    async def publish(
        self,
        job: str,
        payload: Any,
        *,
        headers: Mapping[str, str] | None = None,
        job_id: str | None = None,
        expires: float | timedelta | datetime | None = None,
    ) -> str:
        """Queue ``job``; returns its id. Runs at the next ``join``; with ``expires`` (as
        ``publish``'s) a job still queued when its time passed ends dead ``expired``."""
        job_id = job_id or new_job_id()
        body = _body(payload)
        carried = {k: str(v) for k, v in (headers or {}).items()}
        at = (expires_header(None, expires) or {}).get(HEADER_EXPIRES_AT)
        self._queue.append(_Pending(job, job_id, body, carried, expires_at_ms=at))
        return job_id

    async def group(self, jobs: Iterable[Any], *, then: Any) -> str:
        """``pub.group``: queue ``jobs`` (``Job``s or ``(job, payload)``) as one group; ``then``
        (a ``Job``) is queued once every member ended, with ``ctx.group``. Its id is
        ``<group id>.then``; ``group_status(group_id)`` gives the counts."""
        from leveret.producers import ThenJob, new_group_id, then_id

        group_id = new_group_id()
        ids = []
        for item in jobs:
            job, payload = (item.job, item.payload) if hasattr(item, "job") else item
            ids.append(await self.publish(job, payload, job_id=getattr(item, "job_id", None)))
        if not ids:
            raise ValueError("a group needs at least one member job")
        body = _body(then.payload).decode()
        final = ThenJob(job=then.job, job_id=then_id(group_id), body=body, exchange="",
                        routing_key=then.job, max_attempts=then.max_attempts)  # fmt: skip
        self.groups.add(group_id, ids, final)
        return group_id

    def group_status(self, group_id: str) -> Any:
        """The group's counts (a ``GroupStatus``), as ``pub.status(group_id)`` gives them."""
        return self.groups.status(group_id)

    def _group_ended(self, p: _Pending, state: str, result: Any, error: str | None) -> None:
        final = self.groups.ended(p.job_id, p.job, state, result, error)
        if final is not None:
            body = final.body.encode()
            self._queue.append(_Pending(final.job, final.job_id, body, {}, 0, final.max_attempts))

    async def join(self) -> None:
        """Run queued jobs (and the retries and follow-ups they cause) until none is left."""
        if self._stack is None:
            raise RuntimeError("use TestBroker inside `async with TestBroker(worker) as broker:`")
        runs = 0
        while self._queue:
            runs += 1
            if runs > self.max_runs:
                raise RuntimeError(f"TestBroker ran {self.max_runs} jobs and more keep coming")
            await self._run(self._queue.popleft())

    async def _run(self, p: _Pending) -> None:
        spec = self.worker.jobs.jobs.get(p.job)
        if spec is None:
            return self._dead(p, None, "unknown_job", f"no handler for job {p.job!r}", p.attempts)
        try:
            value = spec.validate(p.body)
        except Exception as exc:
            # The real worker's x-error for it: the same one line, built by the same function.
            return self._dead(p, None, "invalid", one_line(_invalid_payload(exc)), p.attempts)
        if p.expires_at_ms is not None and time.time() * 1000 >= p.expires_at_ms:
            return self._dead(p, value, "expired", "expired before it started", p.attempts)
        collect = _Collect()
        attempt = p.attempts + 1
        max_attempts = p.max_attempts or spec.max_attempts
        ctx = _context(spec, p.job_id, attempt, p.headers, value, collect)
        ctx.max_attempts = max_attempts
        ctx.done_marks = self.memory.marks
        ctx.group = self.groups.group(p.job_id)
        result, error = await execution.run(self._chains[spec.name], ctx)
        if error is None:
            self.succeeded.append(SucceededJob(p.job, p.job_id, result, attempt))
            self._group_ended(p, "succeeded", result, None)
            for f in ctx.follow_ups or ():
                self.enqueued.append(f)
                body = _body(f.payload)
                limit = f.options.get("max_attempts")
                self._queue.append(_Pending(f.job, f.job_id, body, f.headers, 0, limit))
            for step in ctx.before_ack or ():  # as settle: once the follow-ups are out
                await step()
            return None
        described = one_line(f"{type(error).__name__}: {error}")
        if isinstance(error, DecidedOutcome):  # a lock held: back in the queue, unburnt
            self.postponed += 1
            self._queue.append(p)
            return None
        if isinstance(error, Reject) or not spec.retries(error):
            return self._dead(p, value, "rejected", described, attempt)
        if attempt >= max_attempts:
            return self._dead(p, value, "exhausted", described, attempt)
        cause = error if isinstance(error, Exception) else RuntimeError(described)
        if isinstance(error, RetryAfter) and error.after is not None:
            delay = error.after
        else:
            delay = spec.delay_after(attempt, cause)
        self.retries.append(Retry(p.job, p.job_id, attempt, delay, described))
        p.attempts = attempt
        self._queue.append(p)
        return None

    def _dead(self, p: _Pending, payload: Any, reason: str, error: str, attempts: int) -> None:
        self.dead.append(DeadJob(p.job, p.job_id, payload, reason, error, attempts))
        self._group_ended(p, "dead", None, error)
