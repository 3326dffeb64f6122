"""Outcomes: a job is acked only after its outcome is durable, and settle owns every outcome.

* succeeded: the handler returned, so the work is done; ack.
* retried: a copy with ``x-attempts`` goes into the delayed-retry chain; ack once the broker
  confirmed the copy.
* dead-lettered: a copy with ``x-reason``/``x-error``/``x-attempts`` goes to ``Q.dlq``; ack once
  confirmed.

Each outcome is one straight path: ``_finish`` publishes the outcome's copies and waits for
their confirms → acks (coalesced by ``Acker``) → counts; then the outcome's one log line.
Nothing returns to the worker between those steps.

If a copy cannot be confirmed (connection lost, broker nack, or no confirm within
``LEVERET_PUBLISH_TIMEOUT``, e.g. during a memory alarm) the original is not acked: the broker
redelivers it and it runs again. A duplicate at worst, never a loss. The copies go out on a
connection of their own, so a publisher the broker blocks never holds up the acks.

Lifecycle events and ``ctx.enqueue`` follow-ups ride on the same path: ``_finish`` takes the
outcome's copies as a tuple and confirms them together, before the ack. The outcome event
(``succeeded`` with the handler's result, ``retrying``, ``dead``; to ``<exchange>.events``, not
``mandatory``: nobody need be bound) and a successful run's follow-up jobs are more entries in
that tuple: every publish is sent first, then every confirm awaited, so an event costs no extra
round trip beside a retry or DLQ copy. ``lifecycle`` builds those copies and ``outbox`` sends
the copies of every job settling in one loop turn together, each job waiting for its own
confirms only. ``started`` and ``progress`` are best effort: they ride the same batches but
nobody waits for their confirm; a failure is logged. With a status store, a run's follow-up
jobs read ``queued`` once confirmed (written beside the ack, never before it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiormq
import structlog
from pamqp.commands import Basic
from prometheus_client import Counter

from leveret.consumer.delivery.acker import Acker
from leveret.consumer.delivery.copies import EventCopies, FollowUp
from leveret.consumer.delivery.envelope import Delivery
from leveret.consumer.delivery.outbox import Copy, CopyInvalid, Outbox, SettleFailed
from leveret.consumer.errors import Reject, Retry
from leveret.consumer.registry import JobSpec
from leveret.consumer.runtime.metrics import (
    CANCELLED,
    DEAD_LETTERED,
    RETRIED,
    SUCCEEDED,
    UNKNOWN_JOB,
    Outcomes,
)
from leveret.producers.stores import (
    HEADER_DEDUP_KEY,
    DedupUnavailableError,
    StatusWrite,
    status_write,
)
from leveret.producers.wire import CANCELLED as EVENT_CANCELLED
from leveret.producers.wire import (
    DEAD,
    HEADER_ATTEMPTS,
    HEADER_DELIVERY_COUNT,
    HEADER_DIED_AT,
    HEADER_ERROR,
    HEADER_QUEUE,
    HEADER_REASON,
    HEADER_REDELIVERIES,
    PERSISTENT,
    PROGRESS,
    RETRYING,
    STARTED,
    EventsMode,
    carried_headers,
    copy_properties,
    header_count,
    one_line,
    rfc3339_ns,
)
from leveret.producers.wire import SUCCEEDED as EVENT_SUCCEEDED
from leveret.topology.delay import MAX_DELAY_S, retry_route
from leveret.topology.model import dlq_name

if TYPE_CHECKING:
    from leveret.consumer.delivery.status_writer import StatusWriter
    from leveret.consumer.features.groups import GroupEnds
    from leveret.producers.stores import DedupStore

__all__ = ["Copy", "FollowUp", "SettleFailed", "Settler"]

log = structlog.get_logger("leveret.worker")

# After an outcome copy was refused or not confirmed, wait this long (doubling per failure of
# the same job, up to the cap) before giving the job back: a refusing DLQ must not turn into a
# redelivery loop running once a millisecond. The last SETTLE_FAILURES_KEPT jobs are remembered.
SETTLE_BACKOFF_S = 0.5
SETTLE_BACKOFF_MAX_S = 30.0
SETTLE_FAILURES_KEPT = 10_000


def _described(error: BaseException) -> str:
    return one_line(f"{type(error).__name__}: {error}")


class Settler:
    """Publishes outcome copies on a confirming channel, then acks, counts and logs.

    One per session (its channels); ``outcomes`` and ``failures`` (job id -> settles failed in
    a row, oldest forgotten first) belong to the worker and outlive sessions.
    """

    def __init__(
        self,
        publish_channel: aiormq.abc.AbstractChannel,
        acker: Acker,
        exchange: str,
        outcomes: Outcomes,
        failures: dict[str, int],
        *,
        timeout_s: float | None = None,
        events_mode: EventsMode = "off",
        result_max_bytes: int = 65536,
        status: StatusWriter | None = None,
        queue_of: Mapping[str, str] | None = None,
        dedup: DedupStore | None = None,
    ) -> None:
        self.acker = acker
        self.outcomes = outcomes
        self._failures = failures
        self._exchange = exchange
        self.outbox = Outbox(publish_channel, timeout_s)
        self._confirm = self.outbox.confirm
        # Which events this worker publishes, decided once (LEVERET_EVENTS), not per message.
        self.events = EventCopies(exchange, events_mode, result_max_bytes)
        self._event = self.events.event
        self.publishes_started = self.events.started
        self._publishes_outcomes = self.events.outcomes
        # With a status store: each outcome's status is written after its copies are confirmed
        # and before its ack (``_finish``); ``started`` and ``progress`` best effort.
        self.status = status
        # job name -> its queue, for the jobs this worker knows (a follow-up's ``queued``).
        self._queue_of: Mapping[str, str] = queue_of or {}
        # ``ctx.enqueue(..., dedup_key=…)`` claims on the status store's Redis.
        self._dedup = dedup
        self._releases: set[asyncio.Task[bool]] = set()
        self.records_started = self.publishes_started or status is not None
        # Job groups (with a Redis status store): members' endings, the final job's publish.
        # Imported only then: a worker without a status store has no groups to load.
        self.groups: GroupEnds | None = None
        if status is not None:
            from leveret.consumer.features.groups import group_ends

            self.groups = group_ends(status, self._queue_of)

    # -- outcomes ---------------------------------------------------------------------------------

    async def succeeded(
        self,
        d: Delivery,
        job: str,
        duration: float,
        result: Any,
        attempt: int = 1,
        follow_ups: list[FollowUp] | None = None,
        before_ack: list[Callable[[], Awaitable[None]]] | None = None,
    ) -> None:
        """The handler returned ``result``: the ``succeeded`` event carries it (JSON, at most
        ``LEVERET_RESULT_MAX_BYTES``), the run's follow-up jobs go out beside it; ``before_ack``
        runs once they are confirmed, before the ack (``ctx.before_ack``)."""
        children = self.outcomes.children(d.queue, job)
        children.duration.observe(duration)
        copies = tuple(f.copy for f in follow_ups if f.copy is not None) if follow_ups else ()
        events: tuple[Copy, ...] = ()
        value = self.events.result_value(result) if result is not None else None
        if self._publishes_outcomes:
            events = (self.events.succeeded(d, job, attempt, duration, value),)
        writes: list[StatusWrite] = []
        if self.status is not None:
            writes.append(self._write(d, job, EVENT_SUCCEEDED, attempt, duration, result=value))
            if follow_ups:
                writes += [self._queued(f) for f in follow_ups]
        await self._finish(d, SUCCEEDED, children.succeeded, copies, events, writes, before_ack)
        log.debug("job_succeeded", duration_s=round(duration, 6))

    async def failed(
        self, d: Delivery, spec: JobSpec, attempt: int, error: BaseException, duration: float
    ) -> None:
        """The run raised ``error``: a retry copy, or a DLQ copy once attempts are spent."""
        children = self.outcomes.children(d.queue, spec.name)
        children.duration.observe(duration)
        described, took = _described(error), round(duration, 6)
        # ``retry_on=``: an exception it does not list is dead-lettered at once, like a Reject.
        rejected = isinstance(error, Reject) or not spec.retries(error)
        # ``x-max-attempts`` (publish(..., max_attempts=N)) overrides the registered number.
        limit = d.max_attempts if d.max_attempts is not None else spec.max_attempts
        if rejected or attempt >= limit:
            reason = "rejected" if rejected else "exhausted"
            copies: tuple[Copy, ...] = (self._dead_copy(d, spec.name, reason, described, attempt),)
            await self._finish(
                d,
                DEAD_LETTERED,
                children.dead_lettered,
                copies,
                *self._ending(d, spec.name, DEAD, attempt, duration, described),
            )
            # A rejection is the handler's own decision; running out of attempts is a failure.
            (log.warning if rejected else log.error)(
                "job_dead_lettered", reason=reason, error=described, duration_s=took
            )
            if not rejected:
                log.debug("job_traceback", exc_info=error)
            return
        delay = _retry_delay(spec, attempt, error, described)
        headers = carried_headers(d.properties)
        headers[HEADER_ATTEMPTS] = attempt
        if crashes := header_count(d.properties.headers, HEADER_REDELIVERIES):
            headers[HEADER_REDELIVERIES] = crashes  # runs it did not survive stay counted
        route = retry_route(self._exchange, delay, d.queue)
        copies = (self._copy(d, spec.name, headers, *route),)
        await self._finish(
            d,
            RETRIED,
            children.retried,
            copies,
            *self._ending(d, spec.name, RETRYING, attempt, duration, described),
        )
        log.warning("job_retried", error=described, retry_in_s=round(delay, 3), duration_s=took)
        log.debug("job_traceback", exc_info=error)

    async def cancelled(
        self,
        d: Delivery,
        job: str,
        attempt: int,
        duration: float | None = None,
        error: str | None = None,
    ) -> None:
        """The job was cancelled (``producers.cancel``): its ``cancelled`` event is confirmed,
        then it is acked; nothing else is published. ``duration`` is ``None`` for a job that
        did not run now (queued, delayed or back from a retry), ``attempt`` its last run."""
        await self._finish(
            d,
            CANCELLED,
            self.outcomes.children(d.queue, job).cancelled,
            (),
            *self._ending(d, job, EVENT_CANCELLED, attempt, duration, error),
        )
        log.info("job_cancelled", job_id=d.job_id, job=job, queue=d.queue, ran=duration is not None)

    async def dead_without_run(
        self, d: Delivery, label: str, reason: str, error: str, attempts: int
    ) -> None:
        """Dead-letter a message no handler could take; ``label`` is never a wire value."""
        copies: tuple[Copy, ...] = (self._dead_copy(d, d.name, reason, error, attempts),)
        # ``attempt`` is the last run: 0 when no handler ever ran for this job.
        await self._finish(
            d,
            DEAD_LETTERED,
            self.outcomes.children(d.queue, label).dead_lettered,
            copies,
            *self._ending(d, d.name, DEAD, attempts, None, one_line(error)),
        )
        log.error(
            "job_dead_lettered",
            job_id=d.job_id,
            job=label,
            queue=d.queue,
            reason=reason,
            error=one_line(error),
        )

    async def _finish(
        self,
        d: Delivery,
        outcome: str,
        counter: Counter,
        copies: tuple[Copy, ...],
        events: tuple[Copy, ...] = (),
        writes: list[StatusWrite] | None = None,
        before_ack: list[Callable[[], Awaitable[None]]] | None = None,
    ) -> None:
        """The one path of every outcome: confirm the copies that make it true (retry, DLQ,
        follow-ups), then its events, then write its status, then ack and count.

        Events go out only once the copies are confirmed, so a refused copy (the job is given
        back and runs again) leaves no outcome event behind; where there are no copies, they
        are the first step. The status write comes last before the ack: a status never claims
        what the queues do not hold, and an acked job's outcome is never missing.
        """
        if copies:
            await self._confirm(copies)
            if events:
                await self._confirm(events)
        elif events:
            await self._confirm(events)
        for step in before_ack or ():
            await step()
        if writes:
            assert self.status is not None
            await self.status.record(writes)
            if self.groups is not None:  # a group member's ending counted (features.groups)
                await self.groups.ended(d, writes[0], self._confirm, self.status)
        self.acker.ack(d.tag)
        # Each outcome forgets the job's failed settles once it is out (a redelivery guard's
        # requeue is no outcome, so the backoff keeps growing across those).
        if self._failures:
            self._failures.pop(d.job_id, None)
        counter.inc()
        self.outcomes.counts[outcome] += 1

    def _ending(
        self,
        d: Delivery,
        job: str,
        state: Any,
        attempt: int,
        duration: float | None,
        error: str | None,
    ) -> tuple[tuple[Copy, ...], list[StatusWrite] | None]:
        """The outcome event (where events are on) and status write (with a status store) of
        a ``retrying``, ``dead`` or ``cancelled`` outcome."""
        events: tuple[Copy, ...] = ()
        if self._publishes_outcomes:
            events = (self._event(d, job, state, attempt, duration=duration, error=error),)
        writes = None
        if self.status is not None:
            writes = [self._write(d, job, state, attempt, duration, error=error)]
        return events, writes

    def _write(
        self,
        d: Delivery,
        job: str,
        state: str,
        attempt: int,
        duration: float | None,
        *,
        result: Any = None,
        error: str | None = None,
    ) -> StatusWrite:
        now_ns = time.time_ns()
        started_at = None if duration is None else rfc3339_ns(now_ns - int(duration * 1e9))
        headers = d.properties.headers
        key = headers.get(HEADER_DEDUP_KEY) if headers else None  # freed as the job ends
        if isinstance(key, bytes):
            key = key.decode("utf-8", "replace")
        return status_write(
            state,
            d.job_id,
            job,
            d.queue,
            attempt,
            at=rfc3339_ns(now_ns),
            result=result,
            error=error,
            started_at=started_at,
            dedup_key=key if isinstance(key, str) else None,
        )

    def _queued(self, f: FollowUp) -> StatusWrite:
        """A follow-up reads ``queued`` once confirmed (its queue where this worker knows it);
        the same write keeps its dedup claim for the job's life."""
        assert f.copy is not None
        job = f.copy.job
        return status_write(
            "queued", f.job_id, job, self._queue_of.get(job), 0, dedup_key=f.dedup_key
        )

    def started(self, d: Delivery, job: str, attempt: int) -> None:
        """Best effort ``started``: the status (with a store) and the event (``LEVERET_EVENTS=
        all``) are sent, not waited for."""
        if self.status is not None:
            self.status.record_soon(status_write(STARTED, d.job_id, job, d.queue, attempt))
        if self.publishes_started:
            self.outbox.send_best_effort(self._event(d, job, STARTED, attempt), d.job_id)

    async def progress(
        self, d: Delivery, job: str, attempt: int, fraction: float, message: str | None
    ) -> None:
        """Best effort ``progress``: the handler does not wait for the store or a confirm."""
        if self.status is not None:
            self.status.record_soon(
                status_write(
                    PROGRESS, d.job_id, job, d.queue, attempt, progress=fraction, message=message
                )
            )
        if self.events.progress:
            copy = self._event(d, job, PROGRESS, attempt, progress=fraction, message=message)
            self.outbox.send_best_effort(copy, d.job_id)

    async def follow_up(self, job: str, payload: Any, options: dict[str, Any]) -> FollowUp:
        """A handler's ``ctx.enqueue``, built now and published by ``succeeded``. With a
        ``dedup_key`` the key is claimed now (held for the pending TTL until the run's success
        writes the follow-up's ``queued``, which keeps it for the job's life); a key a live job
        holds gives that job's id and nothing to publish."""
        f = self.events.follow_up(job, payload, options)
        if f.dedup_key is None:
            return f
        if self._dedup is None:
            raise DedupUnavailableError()
        holder = await self._dedup.claim(f.dedup_key, f.job_id)
        return f if holder is None else FollowUp(holder, None)

    def release_follow_ups(self, follow_ups: list[FollowUp]) -> None:
        """The run failed: its follow-ups are never published, so their keys are free again
        (best effort: an unreleased claim lapses after the pending TTL)."""
        if self._dedup is None:
            return
        for f in follow_ups:
            if f.dedup_key is not None:
                task = asyncio.get_running_loop().create_task(
                    self._dedup.release(f.dedup_key, f.job_id)
                )
                self._releases.add(task)
                task.add_done_callback(self._releases.discard)

    def _copy(
        self, d: Delivery, job: str, headers: dict[str, Any], exchange: str, routing_key: str
    ) -> Copy:
        props = copy_properties(d.properties, job, d.job_id, headers)
        return Copy(d.message.body, exchange, routing_key, props)

    def _dead_copy(self, d: Delivery, job: str, reason: str, error: str, attempts: int) -> Copy:
        headers = carried_headers(d.properties)
        headers[HEADER_REASON] = reason
        headers[HEADER_ERROR] = one_line(error)
        headers[HEADER_ATTEMPTS] = attempts
        headers[HEADER_DIED_AT] = datetime.now(UTC).isoformat(timespec="milliseconds")
        headers[HEADER_QUEUE] = d.queue
        return self._copy(d, job, headers, "", dlq_name(d.queue))

    async def dead_uncopyable(self, d: Delivery, error: CopyInvalid) -> None:
        """A copy of this job cannot be carried (its headers or properties break AMQP's
        limits): dead-letter it ``invalid`` with a copy that keeps only the body, the content
        type and Leveret's own headers; the id stands in ``x-error`` if it cannot."""
        job_id, name = d.job_id, d.name
        if len(job_id.encode()) > 255:
            job_id = hashlib.sha256(d.job_id.encode()).hexdigest()
        if len(name.encode()) > 255:
            name = UNKNOWN_JOB
        described = one_line(f"message {d.job_id!r} cannot be copied: {error}")
        headers: dict[str, Any] = {
            HEADER_REASON: "invalid",
            HEADER_ERROR: described,
            HEADER_ATTEMPTS: d.attempts,
            HEADER_DIED_AT: datetime.now(UTC).isoformat(timespec="milliseconds"),
            HEADER_QUEUE: d.queue,
        }
        props = Basic.Properties(
            content_type=d.properties.content_type,
            delivery_mode=PERSISTENT,
            message_id=job_id,
            message_type=name,
            headers=headers,
        )
        copy = Copy(d.message.body, "", dlq_name(d.queue), props)
        events, writes = self._ending(d, name, DEAD, d.attempts, None, described)
        counter = self.outcomes.children(d.queue, UNKNOWN_JOB).dead_lettered
        await self._finish(d, DEAD_LETTERED, counter, (copy,), events, writes)
        log.error("job_dead_lettered", job_id=d.job_id, reason="invalid", error=str(error))

    # -- no outcome: the job goes back ------------------------------------------------------------

    async def requeue_counted(self, d: Delivery, redeliveries: int, limit: int) -> None:
        """Put a redelivered job back with its redelivery count persisted in a header."""
        headers = carried_headers(d.properties)
        if d.attempts:
            headers[HEADER_ATTEMPTS] = d.attempts
        headers[HEADER_REDELIVERIES] = redeliveries
        await self._confirm((self._copy(d, d.name, headers, "", d.queue),))
        # Acked at once, not coalesced: the copy may be delivered (and crash a worker) before a
        # coalesced ack would go out, leaving two uncounted copies of the job.
        await self.acker.ack_now(d.tag)
        log.warning(
            "job_redelivered",
            job_id=d.job_id,
            job=d.name,
            queue=d.queue,
            redeliveries=redeliveries,
            limit=limit,
        )

    async def give_back(self, d: Delivery) -> None:
        """Return an unfinished job to its queue as it came: no attempt, no redelivery counted.

        The copy carries the *resolved* job name and id, like every copy Leveret publishes: a
        job sent without ``type`` (named by its routing key) would otherwise come back named
        after its queue, and one without ``message_id`` would get a new id.

        ``basic.nack(requeue=True)`` would flag it redelivered, and the next worker's redelivery
        guard would count a graceful shutdown as a crash: a long job caught by a few rolling
        deploys would reach the DLQ without ever failing. A confirmed copy, then an ack, does not.
        """
        headers = dict(d.properties.headers or {})
        # A quorum queue's count of returns is the broker's to set; a copy starts anew.
        headers.pop(HEADER_DELIVERY_COUNT, None)
        await self._confirm((self._copy(d, d.name, headers, "", d.queue),))
        self.acker.ack(d.tag)

    async def drop_duplicate(self, d: Delivery, job: str, state: str) -> None:
        """Ack a second copy of a job that already ended (``outcomes.AlreadyEnded``)."""
        self.acker.ack(d.tag)
        log.warning(
            "job_duplicate_dropped",
            job_id=d.job_id,
            job=job,
            queue=d.queue,
            first_outcome=state,
            action="acked without running: the first run's outcome stands",
        )

    async def postpone(self, d: Delivery, delay_s: float) -> None:
        """Hand a job its rate limit did not let start back through the delay chain.

        The copy keeps the attempt count it came with (nothing ran, so no attempt burns) and the
        user's headers; like a retry it is confirmed before the ack, so it is never lost. The
        delivery's prefetch slot is freed for other jobs meanwhile.
        """
        headers = carried_headers(d.properties)
        if d.attempts:
            headers[HEADER_ATTEMPTS] = d.attempts
        route = retry_route(self._exchange, min(max(delay_s, 0.0), MAX_DELAY_S), d.queue)
        await self._confirm((self._copy(d, d.name, headers, *route),))
        self.acker.ack(d.tag)
        log.debug("job_postponed", job_id=d.job_id, job=d.name, back_in_s=round(delay_s, 3))

    async def give_back_later(
        self,
        d: Delivery,
        exc: Exception,
        sleep: Callable[[float], Awaitable[None]],
        lost: asyncio.Event,
    ) -> None:
        """Nack an unsettled job for redelivery, after a backoff that grows per job id.

        The outcome copy was refused or never confirmed (a DLQ at max-length with
        reject-publish, a deleted DLQ, an alarm) or something else failed before an outcome:
        requeueing at once would spin the job round the broker about once a millisecond.
        """
        failures = self._failures[d.job_id] = self._failures.pop(d.job_id, 0) + 1
        while len(self._failures) > SETTLE_FAILURES_KEPT:
            self._failures.pop(next(iter(self._failures)))
        delay = min(SETTLE_BACKOFF_S * 2 ** min(failures - 1, 16), SETTLE_BACKOFF_MAX_S)
        with contextlib.suppress(Exception):
            self.outcomes.metrics.settle_failures.labels(queue=d.queue).inc()
        with contextlib.suppress(Exception):
            event = "settle_failed" if isinstance(exc, SettleFailed) else "job_internal_error"
            log.error(
                event,
                job_id=d.job_id,
                queue=d.queue,
                failures=failures,
                error=_described(exc),
                retry_in_s=delay,
                action="job given back after the backoff; it will run again",
            )
        await sleep(delay)
        if not lost.is_set():  # else the broker requeues it with the channel
            with contextlib.suppress(Exception):
                await self.acker.nack(d.tag, requeue=True)


def _retry_delay(spec: JobSpec, attempt: int, error: BaseException, described: str) -> float:
    """The backoff's delay (a ``Retry(after=)``'s own); one that raises or returns NaN falls
    back to 2 ** attempt s."""
    if isinstance(error, Retry) and error.after is not None:
        return min(error.after, MAX_DELAY_S)
    try:
        cause = error if isinstance(error, Exception) else RuntimeError(described)
        return float(spec.delay_after(attempt, cause))
    except Exception as exc:
        delay = min(2.0**attempt, MAX_DELAY_S)
        with contextlib.suppress(Exception):
            log.error("backoff_failed", error=_described(exc), retry_in_s=delay)
        return delay
