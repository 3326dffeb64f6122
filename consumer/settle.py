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
round trip beside a retry or DLQ copy. The copies of every job settling in one loop turn go out
together (``producers.batch.publish_batch``: one socket write, confirms tracked by delivery
tag), each job waiting for its own confirms only; one write per event was most of its cost.
``started`` and ``progress`` are best effort: they ride the same batches but nobody waits for
their confirm; a failure is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple, cast

import aiormq
import structlog
from pamqp.commands import Basic
from prometheus_client import Counter

from leveret.producers.batch import BatchPublishError, publish_batch
from leveret.producers.errors import PublishError, PublishTimeout
from leveret.producers.events import CANCELLED as EVENT_CANCELLED
from leveret.producers.events import (
    DEAD,
    EVENTS_CONTENT_TYPE,
    PROGRESS,
    RETRYING,
    STARTED,
    EventsMode,
    EventState,
    build_event,
    encode_result,
    events_exchange,
    publishes,
)
from leveret.producers.events import SUCCEEDED as EVENT_SUCCEEDED
from leveret.producers.message import (
    HEADER_ATTEMPTS,
    HEADER_DIED_AT,
    HEADER_ERROR,
    HEADER_QUEUE,
    HEADER_REASON,
    HEADER_REDELIVERIES,
    PERSISTENT,
    carried_headers,
    copy_properties,
    one_line,
)
from leveret.producers.publisher import delay_seconds, prepare_job
from leveret.topology.model import MAX_DELAY_S, dlq_name, retry_route

from .acker import Acker
from .delivery import Delivery
from .errors import Reject
from .metrics import CANCELLED, DEAD_LETTERED, RETRIED, SUCCEEDED, Outcomes
from .registry import JobSpec

__all__ = ["Copy", "FollowUp", "SettleFailed", "Settler", "carried_headers", "copy_properties"]

log = structlog.get_logger("leveret.worker")

# After an outcome copy was refused or not confirmed, wait this long (doubling per failure of
# the same job, up to the cap) before giving the job back: a refusing DLQ must not turn into a
# redelivery loop running once a millisecond. The last SETTLE_FAILURES_KEPT jobs are remembered.
SETTLE_BACKOFF_S = 0.5
SETTLE_BACKOFF_MAX_S = 30.0
SETTLE_FAILURES_KEPT = 10_000
_FOLLOW_UP_OPTIONS = frozenset({"priority", "delay", "eta", "job_id", "headers", "max_attempts"})


class SettleFailed(Exception):
    """The outcome copy was not confirmed; the original must stay unacked."""


class Copy(NamedTuple):
    """One message to confirm before the ack; events are not ``mandatory`` (nobody may be bound
    to the events exchange), jobs and their copies are (a job no queue takes is an error)."""

    body: bytes
    exchange: str
    routing_key: str
    properties: Basic.Properties
    mandatory: bool = True

    # What ``publish_batch`` reads of an item besides the fields above.
    @property
    def job(self) -> str:
        return self.properties.message_type or self.routing_key

    @property
    def job_id(self) -> str:
        """The message id: unique per copy in flight (an event's is ``<id>.<state>.<n>``)."""
        return str(self.properties.message_id)


class FollowUp(NamedTuple):
    """A job a handler enqueued (``ctx.enqueue``): published with the success outcome."""

    job_id: str
    copy: Copy


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
    ) -> None:
        self.channel = publish_channel
        self.acker = acker
        self.outcomes = outcomes
        self._failures = failures
        self._exchange = exchange
        # The ids cancelled (``CancelWatch.ids``, bound by the session when the worker has a
        # status store): a failed run of one of these ends ``cancelled`` instead of retrying.
        self.cancelled_ids: Mapping[str, object] = {}
        # A confirm that never comes (memory alarm, quorum queue without a majority) must end
        # as a failed settle, not hold the job's prefetch slot forever.
        self._timeout_s = timeout_s
        # Which events this worker publishes, decided once (LEVERET_EVENTS), not per message.
        self.events_mode: EventsMode = events_mode
        self._events_exchange = events_exchange(exchange)
        self._result_max_bytes = result_max_bytes
        self.publishes_started = publishes(events_mode, STARTED)
        self.publishes_progress = publishes(events_mode, PROGRESS)
        self._publishes_outcomes = publishes(events_mode, EVENT_SUCCEEDED)
        # Copies asked for in this loop turn, sent together by ``_flush`` (see ``_confirm``).
        self._pending: list[tuple[tuple[Copy, ...], asyncio.Future[None]]] = []
        self._flush_scheduled = False
        self._sending: set[asyncio.Task[None]] = set()

    # -- outcomes ---------------------------------------------------------------------------------

    async def succeeded(
        self,
        d: Delivery,
        job: str,
        duration: float,
        result: Any,
        attempt: int = 1,
        follow_ups: list[FollowUp] | None = None,
    ) -> None:
        """The handler returned ``result``: the ``succeeded`` event carries it (JSON, at most
        ``LEVERET_RESULT_MAX_BYTES``), the run's follow-up jobs go out beside it."""
        children = self.outcomes.children(d.queue, job)
        children.duration.observe(duration)
        copies: tuple[Copy, ...] = ()
        if self._publishes_outcomes:
            value = None
            if result is not None:
                encoded = encode_result(result, self._result_max_bytes)
                value = encoded.value
                if encoded.dropped is not None:
                    log.warning(
                        "result_dropped",
                        reason=encoded.dropped,
                        size=encoded.size,
                        limit=self._result_max_bytes,
                        action="the succeeded event and status carry null; the job succeeded",
                    )
            copies = (
                self._event(d, job, EVENT_SUCCEEDED, attempt, duration=duration, result=value),
            )
        if follow_ups:
            copies += tuple(f.copy for f in follow_ups)
        await self._finish(d, SUCCEEDED, children.succeeded, copies)
        log.debug("job_succeeded", duration_s=round(duration, 6))

    async def failed(
        self, d: Delivery, spec: JobSpec, attempt: int, error: BaseException, duration: float
    ) -> None:
        """The run raised ``error``: a retry copy, or a DLQ copy once attempts are spent."""
        children = self.outcomes.children(d.queue, spec.name)
        children.duration.observe(duration)
        described, took = _described(error), round(duration, 6)
        rejected = isinstance(error, Reject)
        # ``x-max-attempts`` (publish(..., max_attempts=N)) overrides the registered number.
        limit = d.max_attempts if d.max_attempts is not None else spec.max_attempts
        if rejected or attempt >= limit:
            reason = "rejected" if rejected else "exhausted"
            copies: tuple[Copy, ...] = (self._dead_copy(d, spec.name, reason, described, attempt),)
            if self._publishes_outcomes:
                copies += (
                    self._event(d, spec.name, DEAD, attempt, duration=duration, error=described),
                )
            await self._finish(d, DEAD_LETTERED, children.dead_lettered, copies)
            # A rejection is the handler's own decision; running out of attempts is a failure.
            (log.warning if rejected else log.error)(
                "job_dead_lettered", reason=reason, error=described, duration_s=took
            )
            if not rejected:
                log.debug("job_traceback", exc_info=error)
            return
        if d.job_id in self.cancelled_ids:  # cancelled while it ran: not run again
            await self.cancelled(d, spec.name, attempt, duration, described)
            return
        delay = _retry_delay(spec, attempt, error, described)
        headers = carried_headers(d.properties)
        headers[HEADER_ATTEMPTS] = attempt
        route = retry_route(self._exchange, delay, d.queue)
        copies = (self._copy(d, spec.name, headers, *route),)
        if self._publishes_outcomes:
            copies += (
                self._event(d, spec.name, RETRYING, attempt, duration=duration, error=described),
            )
        await self._finish(d, RETRIED, children.retried, copies)
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
        copies: tuple[Copy, ...] = ()
        if self._publishes_outcomes:
            copies = (
                self._event(d, job, EVENT_CANCELLED, attempt, duration=duration, error=error),
            )
        await self._finish(d, CANCELLED, self.outcomes.children(d.queue, job).cancelled, copies)
        log.info("job_cancelled", job_id=d.job_id, job=job, queue=d.queue, ran=duration is not None)

    async def dead_without_run(
        self, d: Delivery, label: str, reason: str, error: str, attempts: int
    ) -> None:
        """Dead-letter a message no handler could take; ``label`` is never a wire value."""
        copies: tuple[Copy, ...] = (self._dead_copy(d, d.name, reason, error, attempts),)
        if self._publishes_outcomes:
            # ``attempt`` is the last run: 0 when no handler ever ran for this job.
            copies += (self._event(d, d.name, DEAD, attempts, error=one_line(error)),)
        await self._finish(
            d, DEAD_LETTERED, self.outcomes.children(d.queue, label).dead_lettered, copies
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
        self, d: Delivery, outcome: str, counter: Counter, copies: tuple[Copy, ...]
    ) -> None:
        """Confirm the outcome's copies, then ack and count: the one path of every outcome."""
        if copies:  # the one place copies are gathered: outcome copy, event, follow-ups
            await self._confirm(copies)
        self.acker.ack(d.tag)
        # Each outcome forgets the job's failed settles once it is out (a redelivery guard's
        # requeue is no outcome, so the backoff keeps growing across those).
        if self._failures:
            self._failures.pop(d.job_id, None)
        counter.inc()
        self.outcomes.counts[outcome] += 1

    # -- events -----------------------------------------------------------------------------------

    def _event(
        self,
        d: Delivery,
        job: str,
        state: EventState,
        attempt: int,
        *,
        duration: float | None = None,
        error: str | None = None,
        result: Any = None,
        progress: float | None = None,
        message: str | None = None,
    ) -> Copy:
        """An event for ``<exchange>.events``, routing key ``<job>.<state>``.

        Its ``message_id`` is ``<job id>.<state>.<attempt>``, not the job id: aiormq matches a
        ``basic.return`` to its publish by ``message_id``, and the event is pipelined beside the
        job's own copy; sharing the id would let a returned DLQ copy be taken for the event.
        """
        body = build_event(
            job_id=d.job_id,
            job=job,
            queue=d.queue,
            state=state,
            attempt=attempt,
            duration_s=duration,
            error=error,
            result=result,
            progress=progress,
            message=message,
        )
        props = Basic.Properties(
            content_type=EVENTS_CONTENT_TYPE,
            delivery_mode=PERSISTENT,
            message_id=f"{d.job_id}.{state}.{attempt}",
            message_type=job,
        )
        return Copy(body, self._events_exchange, f"{job}.{state}", props, False)

    def started(self, d: Delivery, job: str, attempt: int) -> None:
        """Best effort ``started`` (``LEVERET_EVENTS=all``): sent, not waited for."""
        self._send_best_effort(self._event(d, job, STARTED, attempt), d.job_id)

    async def progress(
        self, d: Delivery, job: str, attempt: int, fraction: float, message: str | None
    ) -> None:
        """Best effort ``progress``: the handler does not wait for a confirm."""
        if self.publishes_progress:
            copy = self._event(d, job, PROGRESS, attempt, progress=fraction, message=message)
            self._send_best_effort(copy, d.job_id)

    def follow_up(self, job: str, payload: Any, options: dict[str, Any]) -> FollowUp:
        """A handler's ``ctx.enqueue``: validated and built now, by the publisher's own builder
        (so a bad payload or option raises in the handler), published by ``succeeded``."""
        unknown = set(options) - _FOLLOW_UP_OPTIONS
        if unknown:
            raise TypeError(f"ctx.enqueue got unexpected option(s): {', '.join(sorted(unknown))}")
        delay_s = delay_seconds(options.get("delay"), options.get("eta"))
        p = prepare_job(
            self._exchange,
            job,
            payload,
            options.get("priority"),
            delay_s,
            options.get("job_id"),
            options.get("headers"),
            options.get("max_attempts"),
        )
        return FollowUp(p.job_id, Copy(p.body, p.exchange, p.routing_key, p.properties))

    def _send_best_effort(self, copy: Copy, job_id: str) -> None:
        """Into the next batch like any copy, but nobody waits: a failure is only logged."""
        waiter = asyncio.get_running_loop().create_future()
        waiter.add_done_callback(functools.partial(_log_lost_event, copy, job_id))
        self._enqueue((copy,), waiter)

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
        await self._confirm((self._copy(d, d.name, headers, "", d.queue),))
        self.acker.ack(d.tag)

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

    # -- confirms ---------------------------------------------------------------------------------

    async def _confirm(self, copies: tuple[Copy, ...]) -> None:
        """Publish every copy and wait for all their confirms; raise ``SettleFailed`` if any
        was not confirmed.

        Copies are not sent one by one: every copy asked for in one loop turn (the outcomes of
        the jobs that finished together, and their events and follow-ups) goes out in one
        ``publish_batch``, one socket write whose confirms are tracked by delivery tag. With
        ``LEVERET_EVENTS=outcomes`` every job publishes before its ack, and a write (a syscall)
        per event was most of what that cost; each job still waits for its own confirms only.
        """
        waiter = asyncio.get_running_loop().create_future()
        self._enqueue(copies, waiter)
        await waiter

    def _enqueue(self, copies: tuple[Copy, ...], waiter: asyncio.Future[None]) -> None:
        self._pending.append((copies, waiter))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[tuple[Copy, ...], asyncio.Future[None]]]) -> None:
        items = [copy for copies, _ in batch for copy in copies]
        failed: dict[str, PublishError] = {}
        everything: BaseException | None = None
        try:
            await publish_batch(cast(aiormq.Channel, self.channel), items, timeout=self._timeout_s)
        except BatchPublishError as exc:
            failed = exc.errors
        except Exception as exc:  # the channel is gone, or a bug: nothing is known confirmed
            everything = exc
        for copies, waiter in batch:
            if waiter.done():
                continue  # its job was cancelled meanwhile
            error: BaseException | None = everything
            if error is None and failed:
                error = next((failed[c.job_id] for c in copies if c.job_id in failed), None)
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(_settle_failed(error))


def _log_lost_event(copy: Copy, job_id: str, waiter: asyncio.Future[None]) -> None:
    if waiter.cancelled() or waiter.exception() is None:
        return
    with contextlib.suppress(Exception):
        log.warning(
            "event_not_published",
            job_id=job_id,
            routing_key=copy.routing_key,
            error=str(waiter.exception()),
            action="best effort: the job goes on; its outcome event is still confirmed",
        )


def _settle_failed(error: BaseException) -> SettleFailed:
    if isinstance(error, PublishTimeout):
        return SettleFailed(
            f"outcome copy not confirmed within {error.timeout_s:g} s "
            f"(LEVERET_PUBLISH_TIMEOUT; is the broker blocking publishers?)"
        )
    return SettleFailed(f"{type(error).__name__}: {error}")


def _retry_delay(spec: JobSpec, attempt: int, error: BaseException, described: str) -> float:
    """The backoff's delay; one that raises or returns NaN falls back to 2 ** attempt s."""
    try:
        cause = error if isinstance(error, Exception) else RuntimeError(described)
        return float(spec.delay_after(attempt, cause))
    except Exception as exc:
        delay = min(2.0**attempt, MAX_DELAY_S)
        with contextlib.suppress(Exception):
            log.error("backoff_failed", error=_described(exc), retry_in_s=delay)
        return delay
