"""Errors of the publishing side (see ``leveret.topology.errors`` for the whole tree)."""

from __future__ import annotations

from leveret.topology.errors import InvalidValueError, LeveretError


class InvalidPriorityError(InvalidValueError):
    """A priority that is not an integer from 0 to 9."""

    def __init__(self, priority: object, highest: int) -> None:
        self.priority = priority
        super().__init__(f"priority must be an integer from 0 to {highest}, got {priority!r}")


class InvalidMaxAttemptsError(InvalidValueError):
    """A per-publish ``max_attempts`` that is not a positive integer."""

    def __init__(self, max_attempts: object) -> None:
        self.max_attempts = max_attempts
        super().__init__(f"max_attempts must be an integer of 1 or more, got {max_attempts!r}")


class InvalidPayloadError(InvalidValueError, TypeError):
    """A payload that is not a dict or a pydantic model (a ``TypeError`` too: it is one)."""

    def __init__(self, payload: object) -> None:
        self.payload_type = type(payload).__name__
        super().__init__(
            f"a job payload must be a dict or a pydantic model, not {self.payload_type}"
        )


class DuplicateJobIdError(InvalidValueError):
    """One ``publish_many`` batch names the same job id twice."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(
            f"job id {job_id!r} appears twice in one publish_many batch: ids must be unique "
            f"(the broker's return of an unroutable job is matched by id)"
        )


class BrokerUnavailable(LeveretError, ConnectionError):
    """The broker could not be reached or refused the connection.

    The URL in the message is always masked: a password never reaches a log line through here.
    """

    def __init__(self, url: str, reason: str, advice: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"cannot connect to RabbitMQ at {url}: {reason}; {advice}")


class PublishError(LeveretError):
    """A job could not be safely handed to the broker; the caller must assume it was not queued.

    ``maybe_queued``: ``False`` when it certainly is not (the broker said so: nacked, returned,
    no such exchange; or it never left this process), ``True`` when the outcome is unknown (no
    confirm in time, the connection lost after sending): it may be queued, and may run. A
    de-duplication claim is freed at once only for the first kind (``producers.dedup``).
    """

    maybe_queued: bool = False

    def __init__(self, job: str, message: str) -> None:
        self.job = job
        super().__init__(message)


class InvalidMessageError(InvalidValueError, PublishError):
    """A message AMQP cannot carry: a job id, job name or other short-string property over
    255 UTF-8 bytes, a header key over 128 bytes, a header value with no AMQP type (a set, an
    integer past 64 bits...). A ``ValueError`` raised before anything is sent; in a
    ``BatchPublishError`` (a copy built elsewhere) the one job it names, never the batch."""

    def __init__(self, job: str, job_id: str | None, message: str) -> None:
        self.job_id = job_id
        super().__init__(job, message)


class UnroutableError(PublishError):
    """No queue is bound for the job, so RabbitMQ returned it (``mandatory``)."""

    def __init__(self, job: str, exchange: str, routing_key: str) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        super().__init__(
            job,
            f"job {job!r} is unroutable: no queue is bound to exchange {exchange!r} for it; "
            f"start a worker that serves {job!r} or run `leveret topology declare APP`",
        )


class RefusedError(PublishError):
    """The broker nacked the job (e.g. a full quorum queue, an internal error)."""

    def __init__(self, job: str, detail: str = "") -> None:
        super().__init__(
            job,
            f"the broker refused job {job!r}{': ' + detail if detail else ''}; it was not "
            f"queued, try again later",
        )


class ConnectionLost(PublishError, ConnectionError):
    """The connection failed while the job was being published; it may or may not be queued.

    Also a ``ConnectionError``, so a loop that reconnects on connection errors treats it as one.
    """

    maybe_queued = True

    def __init__(self, job: str, cause: str) -> None:
        self.cause = cause
        super().__init__(
            job,
            f"job {job!r} may not have been queued: the connection failed ({cause}); "
            f"publish it again",
        )


class PublishTimeout(PublishError, TimeoutError):
    """No confirm arrived in time: broker blocked by an alarm, connection lost, or overloaded.

    ``sent=False``: the time ran out before the job was handed over (waiting for a channel
    during a reconnect), so it is certainly not queued (``maybe_queued`` is then ``False``).
    """

    maybe_queued = True

    def __init__(self, job: str, timeout_s: float, *, sent: bool = True) -> None:
        self.timeout_s = timeout_s
        self.maybe_queued = sent
        super().__init__(
            job,
            f"job {job!r} was not confirmed by the broker within {timeout_s:g} s (is it down, "
            f"or blocked by a memory/disk alarm?); "
            + ("it may or may not have been queued" if sent else "it was not sent, so not queued"),
        )
