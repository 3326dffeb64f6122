"""Outcomes: a job is acked only after its outcome is durable, and settle owns every outcome.

* succeeded: the handler returned, so the work is done; ack.
* retried: a copy with ``x-attempts`` goes into the delayed-retry chain; ack once the broker
  confirmed the copy.
* dead-lettered: a copy with ``x-reason``/``x-error``/``x-attempts`` goes to ``Q.dlq``; ack once
  confirmed.

Each outcome is one straight path in ``Settler._finish``: publish the outcome copies and wait
for their confirms → ack (coalesced by ``Acker``) → metric → one log line. Nothing returns to
the worker between those steps.

If a copy cannot be confirmed (connection lost, broker nack, or no confirm within
``LEVERET_PUBLISH_TIMEOUT``, e.g. during a memory alarm) the original is not acked: the broker
redelivers it and it runs again. A duplicate at worst, never a loss. The copies go out on a
connection of their own, so a publisher the broker blocks never holds up the acks.

Seam for lifecycle events and ``ctx.enqueue`` follow-ups: ``_finish`` takes the outcome's
copies as a list and confirms them together (pipelined on the one channel), before the ack. An
outcome event (``succeeded`` with the handler's result, which ``succeeded`` already receives,
``retried``, ``dead_lettered``) and a successful run's follow-up jobs are more entries in that
list, so they are confirmed before the ack, beside the retry or DLQ copy, with no new path.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import aiormq
import structlog
from pamqp.commands import Basic

from leveret.producers.confirm import publish_confirmed
from leveret.producers.errors import PublishError, PublishTimeout
from leveret.producers.message import (
    HEADER_ATTEMPTS,
    HEADER_DIED_AT,
    HEADER_ERROR,
    HEADER_QUEUE,
    HEADER_REASON,
    HEADER_REDELIVERIES,
    carried_headers,
    copy_properties,
    one_line,
)
from leveret.topology.model import MAX_DELAY_S, dlq_name, retry_route

from .acker import Acker
from .delivery import Delivery
from .errors import Reject
from .metrics import DEAD_LETTERED, RETRIED, SUCCEEDED, WorkerMetrics
from .registry import JobSpec

__all__ = ["SettleFailed", "Settler", "Tally", "carried_headers", "copy_properties"]

log = structlog.get_logger("leveret.worker")

# After an outcome copy was refused or not confirmed, wait this long (doubling per failure of
# the same job, up to the cap) before giving the job back: a refusing DLQ must not turn into a
# redelivery loop running once a millisecond.
SETTLE_BACKOFF_S = 0.5
SETTLE_BACKOFF_MAX_S = 30.0
# Jobs whose settle failures are remembered (oldest forgotten first).
SETTLE_FAILURES_KEPT = 10_000


class SettleFailed(Exception):
    """The outcome copy was not confirmed; the original must stay unacked."""


class Copy(NamedTuple):
    """One message to confirm before the ack."""

    body: bytes
    exchange: str
    routing_key: str
    properties: Basic.Properties


@dataclass(slots=True)
class _Children:
    """Metric children for one (queue, job): resolved once, not per message."""

    succeeded: Any
    retried: Any
    dead_lettered: Any
    duration: Any


@dataclass(eq=False)
class Tally:
    """What outlives a session: metric children, outcome counts, failed settles per job."""

    metrics: WorkerMetrics
    counts: dict[str, int] = field(
        default_factory=lambda: {SUCCEEDED: 0, RETRIED: 0, DEAD_LETTERED: 0}
    )
    failures: dict[str, int] = field(default_factory=dict)
    _children: dict[tuple[str, str], _Children] = field(default_factory=dict)

    def children(self, queue: str, job: str) -> _Children:
        children = self._children.get((queue, job))
        if children is None:
            m, labels = self.metrics, {"queue": queue, "job_name": job}
            children = self._children[(queue, job)] = _Children(
                succeeded=m.completed.labels(**labels, outcome=SUCCEEDED),
                retried=m.completed.labels(**labels, outcome=RETRIED),
                dead_lettered=m.completed.labels(**labels, outcome=DEAD_LETTERED),
                duration=m.duration.labels(**labels),
            )
        return children

    def failed_again(self, job_id: str) -> int:
        """Count one more failed settle of ``job_id``; return how many in a row."""
        failures = self.failures.pop(job_id, 0) + 1
        self.failures[job_id] = failures
        while len(self.failures) > SETTLE_FAILURES_KEPT:
            self.failures.pop(next(iter(self.failures)))
        return failures


def _described(error: BaseException) -> str:
    return one_line(f"{type(error).__name__}: {error}")


class Settler:
    """Publishes outcome copies on a confirming channel, then acks, counts and logs."""

    def __init__(
        self,
        publish_channel: aiormq.abc.AbstractChannel,
        acker: Acker,
        exchange: str,
        tally: Tally,
        *,
        timeout_s: float | None = None,
    ) -> None:
        self.channel = publish_channel
        self.acker = acker
        self.tally = tally
        self._exchange = exchange
        # A confirm that never comes (memory alarm, quorum queue without a majority) must end
        # as a failed settle, not hold the job's prefetch slot forever.
        self._timeout_s = timeout_s

    # -- outcomes of a run ---------------------------------------------------------------------

    async def succeeded(self, d: Delivery, job: str, duration: float, result: Any) -> None:
        """The handler returned ``result`` (the seam for a ``succeeded`` event's result)."""
        children = self.tally.children(d.queue, job)
        children.duration.observe(duration)
        await self._finish(
            d,
            children.succeeded,
            SUCCEEDED,
            (),
            log.debug,
            "job_succeeded",
            {"duration_s": round(duration, 6)},
        )

    async def failed(
        self, d: Delivery, spec: JobSpec, attempt: int, error: BaseException, duration: float
    ) -> None:
        """The run raised ``error``: a retry copy, or a DLQ copy once attempts are spent."""
        children = self.tally.children(d.queue, spec.name)
        children.duration.observe(duration)
        described = _described(error)
        rejected = isinstance(error, Reject)
        took = {"error": described, "duration_s": round(duration, 6)}
        if rejected or attempt >= spec.max_attempts:
            reason = "rejected" if rejected else "exhausted"
            copy = self._dead_copy(d, spec.name, reason, described, attempt)
            # A rejection is the handler's own decision; running out of attempts is a failure.
            level = log.warning if rejected else log.error
            await self._finish(
                d,
                children.dead_lettered,
                DEAD_LETTERED,
                (copy,),
                level,
                "job_dead_lettered",
                {"reason": reason, **took},
            )
            if not rejected:
                log.debug("job_traceback", exc_info=error)
            return
        delay = _retry_delay(spec, attempt, error, described)
        headers = carried_headers(d.properties)
        headers[HEADER_ATTEMPTS] = attempt
        exchange, routing_key = retry_route(self._exchange, delay, d.queue)
        copy = Copy(
            d.message.body,
            exchange,
            routing_key,
            copy_properties(d.properties, spec.name, d.job_id, headers),
        )
        await self._finish(
            d,
            children.retried,
            RETRIED,
            (copy,),
            log.warning,
            "job_retried",
            {"retry_in_s": round(delay, 3), **took},
        )
        log.debug("job_traceback", exc_info=error)

    async def dead_without_run(
        self, d: Delivery, label: str, reason: str, error: str, attempts: int
    ) -> None:
        """Dead-letter a message no handler could take; ``label`` is never a wire value."""
        copy = self._dead_copy(d, d.name, reason, error, attempts)
        counter = self.tally.children(d.queue, label).dead_lettered
        await self._finish(
            d,
            counter,
            DEAD_LETTERED,
            (copy,),
            log.error,
            "job_dead_lettered",
            {
                "job_id": d.job_id,
                "job": label,
                "queue": d.queue,
                "reason": reason,
                "error": one_line(error),
            },
        )

    async def _finish(
        self,
        d: Delivery,
        counter: Any,
        outcome: str,
        copies: tuple[Copy, ...],
        level: Callable[..., Any],
        event: str,
        fields: dict[str, Any],
    ) -> None:
        """publish copies → ack → metric → one log line: the one path of every outcome."""
        if copies:
            await self._confirm(copies)
        self.acker.ack(d.tag)
        tally = self.tally
        # Each outcome forgets the job's failed settles once it is out (a redelivery guard's
        # requeue is no outcome, so the backoff keeps growing across those).
        if tally.failures:
            tally.failures.pop(d.job_id, None)
        counter.inc()
        tally.counts[outcome] += 1
        level(event, **fields)

    def _dead_copy(self, d: Delivery, job: str, reason: str, error: str, attempts: int) -> Copy:
        headers = carried_headers(d.properties)
        headers[HEADER_REASON] = reason
        headers[HEADER_ERROR] = one_line(error)
        headers[HEADER_ATTEMPTS] = attempts
        headers[HEADER_DIED_AT] = datetime.now(UTC).isoformat(timespec="milliseconds")
        headers[HEADER_QUEUE] = d.queue
        props = copy_properties(d.properties, job or "", d.job_id, headers)
        return Copy(d.message.body, "", dlq_name(d.queue), props)

    # -- no outcome: the job goes back -----------------------------------------------------------

    async def requeue_counted(self, d: Delivery, redeliveries: int, limit: int) -> None:
        """Put a redelivered job back with its redelivery count persisted in a header."""
        headers = carried_headers(d.properties)
        if d.attempts:
            headers[HEADER_ATTEMPTS] = d.attempts
        headers[HEADER_REDELIVERIES] = redeliveries
        props = copy_properties(d.properties, d.name, d.job_id, headers)
        await self._confirm((Copy(d.message.body, "", d.queue, props),))
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
        props = d.properties
        headers = dict(props.headers) if props.headers else {}
        copy = Copy(d.message.body, "", d.queue, copy_properties(props, d.name, d.job_id, headers))
        await self._confirm((copy,))
        self.acker.ack(d.tag)

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
        failures = self.tally.failed_again(d.job_id)
        delay = min(SETTLE_BACKOFF_S * 2 ** min(failures - 1, 16), SETTLE_BACKOFF_MAX_S)
        with contextlib.suppress(Exception):
            self.tally.metrics.settle_failures.labels(queue=d.queue).inc()
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
        if lost.is_set():
            return  # the broker requeues it with the channel
        with contextlib.suppress(Exception):
            await self.acker.nack(d.tag, requeue=True)

    # -- confirms -------------------------------------------------------------------------------

    async def _confirm(self, copies: tuple[Copy, ...]) -> None:
        """Publish every copy and wait for all their confirms (pipelined on one channel)."""
        if len(copies) == 1:
            await self._publish(copies[0])
        else:
            await asyncio.gather(*(self._publish(copy) for copy in copies))

    async def _publish(self, copy: Copy) -> None:
        try:
            await publish_confirmed(
                self.channel,
                copy.body,
                exchange=copy.exchange,
                routing_key=copy.routing_key,
                properties=copy.properties,
                timeout=self._timeout_s,
            )
        except PublishTimeout as exc:
            raise SettleFailed(
                f"outcome copy not confirmed within {exc.timeout_s:g} s "
                f"(LEVERET_PUBLISH_TIMEOUT; is the broker blocking publishers?)"
            ) from None
        except PublishError as exc:
            raise SettleFailed(f"{type(exc).__name__}: {exc}") from None


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
