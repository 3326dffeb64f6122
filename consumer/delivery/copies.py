"""What a run publishes beside its outcome: lifecycle events and ``ctx.enqueue`` follow-ups.

Settle puts these into the same tuple as the outcome's own copy, so they are confirmed
together before the ack (``outbox``). An event goes to ``<exchange>.events`` with routing key
``<job>.<state>``, not ``mandatory`` (nobody need be bound); ``LEVERET_EVENTS`` decides once,
here, which states a worker publishes. A follow-up is validated and built when the handler calls
``ctx.enqueue`` (by the publisher's own builder, so a bad payload raises in the handler) and
published only with a successful outcome.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

import structlog
from pamqp.commands import Basic

from leveret.consumer.delivery.envelope import Delivery
from leveret.consumer.delivery.outbox import Copy
from leveret.producers import delay_seconds, prepare_job
from leveret.producers.stores import HEADER_DEDUP_KEY, check_dedup_key
from leveret.producers.wire import (
    EVENTS_CONTENT_TYPE,
    PERSISTENT,
    PROGRESS,
    STARTED,
    SUCCEEDED,
    EventsMode,
    EventState,
    build_event,
    encode_result,
    events_exchange,
    expires_header,
    publishes,
)

log = structlog.get_logger("leveret.worker")

_FOLLOW_UP_OPTIONS = frozenset(
    {"priority", "delay", "eta", "job_id", "headers", "max_attempts", "dedup_key", "expires"}
)


class FollowUp(NamedTuple):
    """A job a handler enqueued (``ctx.enqueue``): published with the success outcome.

    With a ``dedup_key`` held by a live job, ``copy`` is ``None`` and ``job_id`` that job's:
    nothing is published (see ``Settler.follow_up``)."""

    job_id: str
    copy: Copy | None
    dedup_key: str | None = None


def event_id(job_id: str, state: str, attempt: int) -> str:
    """``<job id>.<state>.<attempt>``, unique per event in flight; for a job id so long that
    this would pass AMQP's 255 bytes, a digest of the id stands in for it (the body carries
    the full ``job_id``)."""
    mid = f"{job_id}.{state}.{attempt}"
    if len(mid) > 63 and len(mid.encode()) > 255:  # the length check first: ids are short
        mid = f"{hashlib.sha256(job_id.encode()).hexdigest()}.{state}.{attempt}"
    return mid


class EventCopies:
    """Builds one worker's event and follow-up copies; which events, decided once."""

    def __init__(self, exchange: str, mode: EventsMode, result_max_bytes: int) -> None:
        self._jobs_exchange = exchange
        self.exchange = events_exchange(exchange)
        self.mode: EventsMode = mode
        self.started = publishes(mode, STARTED)
        self.progress = publishes(mode, PROGRESS)
        self.outcomes = publishes(mode, SUCCEEDED)
        self._result_max_bytes = result_max_bytes

    def event(
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
            message_id=event_id(d.job_id, state, attempt),
            message_type=job,
        )
        return Copy(body, self.exchange, f"{job}.{state}", props, False)

    def result_value(self, result: Any) -> Any:
        """The handler's result as JSON for the status and the ``succeeded`` event when it
        fits within ``LEVERET_RESULT_MAX_BYTES`` (else ``None``, and a warning: the job still
        succeeded)."""
        encoded = encode_result(result, self._result_max_bytes)
        if encoded.dropped is not None:
            log.warning(
                "result_dropped",
                reason=encoded.dropped,
                size=encoded.size,
                limit=self._result_max_bytes,
                action="the succeeded event and status carry null; the job succeeded",
            )
        return encoded.value

    def succeeded(self, d: Delivery, job: str, attempt: int, duration: float, value: Any) -> Copy:
        """The ``succeeded`` event, carrying the result ``value`` (see ``result_value``)."""
        return self.event(d, job, SUCCEEDED, attempt, duration=duration, result=value)

    def follow_up(self, job: str, payload: Any, options: dict[str, Any]) -> FollowUp:
        """A handler's ``ctx.enqueue``: validated and built now, by the publisher's own builder
        (so a bad payload or option raises in the handler), published by ``succeeded``."""
        unknown = set(options) - _FOLLOW_UP_OPTIONS
        if unknown:
            raise TypeError(f"ctx.enqueue got unexpected option(s): {', '.join(sorted(unknown))}")
        delay_s = delay_seconds(options.get("delay"), options.get("eta"))
        headers = expires_header(options.get("headers"), options.get("expires"))
        key = options.get("dedup_key")
        if key is not None:  # carried like a publish's, so the job's ending can free it
            headers = {**(headers or {}), HEADER_DEDUP_KEY: check_dedup_key(key)}
        p = prepare_job(
            self._jobs_exchange,
            job,
            payload,
            options.get("priority"),
            delay_s,
            options.get("job_id"),
            headers,
            options.get("max_attempts"),
        )
        return FollowUp(p.job_id, Copy(p.body, p.exchange, p.routing_key, p.properties), key)
