"""What a handler (and a middleware around it) may learn about the job it runs, and the two
things it may do beyond returning: report progress, and enqueue follow-up jobs."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from structlog.typing import FilteringBoundLogger


class _FollowUp(Protocol):
    @property
    def job_id(self) -> str: ...

    @property
    def copy(self) -> object | None: ...


class Lifecycle(Protocol):
    """What the worker plugs into a context (its ``Settler``): kept abstract so a context can be
    built by hand in a test, where ``progress`` does nothing and ``enqueue`` is refused."""

    async def progress(
        self, d: Any, job: str, attempt: int, fraction: float, message: str | None
    ) -> None: ...

    async def follow_up(self, job: str, payload: Any, options: dict[str, Any]) -> _FollowUp: ...

    # Whether ``started`` is recorded (a status store, or ``LEVERET_EVENTS=all``), and how.
    records_started: bool

    def started(self, d: Any, job: str, attempt: int) -> None: ...


# W3C trace context: carried from a job to the jobs it enqueues.
TRACE_HEADERS = ("traceparent", "tracestate")


@dataclass(slots=True)
class JobContext:
    job_id: str
    job: str
    queue: str
    attempt: int  # 1 on the first run
    max_attempts: int
    log: FilteringBoundLogger
    redelivered: bool = False
    priority: int | None = None
    # What the publisher set with ``publish(..., headers=...)``, as str, on every attempt
    # (``traceparent`` among them); Leveret's own ``x-…`` bookkeeping is left out.
    headers: dict[str, str] = field(default_factory=dict)
    # The validated payload, as the handler receives it; middleware may read it.
    payload: Any = None
    # Set by the worker: where progress and follow-ups go (see ``progress``/``enqueue``).
    lifecycle: Lifecycle | None = None
    delivery: Any = None
    follow_ups: list[Any] | None = None
    # Run by settle once a successful run's follow-ups are confirmed, before its ack (a done
    # mark of ``idempotency_key=`` must not skip a rerun whose follow-ups never went out).
    before_ack: list[Callable[[], Awaitable[None]]] | None = None
    # A group's final job (``pub.group(..., then=...)``): its members' endings, a
    # ``leveret.producers.groups.JobGroup`` (ids, states, results, counts); else ``None``.
    group: Any = None
    # ``lock=`` jobs: the hold's fencing token (grows with every acquisition), and whether the
    # lock was lost while this run held it (``leveret.consumer.features.locks``); a group's
    # final job sets ``lock_lost`` too when its ``<group id>.then`` hold is lost.
    lock_token: int | None = None
    lock_lost: bool = False
    # Where ``done_before``/``mark_done`` keep their marks (Redis; set by the worker).
    done_marks: Any = None

    async def done_before(self, key: str) -> bool:
        """Whether ``await ctx.mark_done(key)`` ran before, in any run of any job (kept for
        ``LEVERET_IDEMPOTENCY_TTL``). Needs Redis (``LEVERET_STATUS_URL``): ``ConfigError``
        without it. See ``leveret.consumer.features.idempotency``."""
        from leveret.consumer.features.idempotency import no_marks, user_key

        if self.done_marks is None:
            raise no_marks()
        done, _ = await self.done_marks.lookup(user_key(key))
        return bool(done)

    async def mark_done(self, key: str) -> None:
        """Record that the side effect ``key`` names happened: later ``done_before(key)`` is
        true. Call it right after the side effect."""
        from leveret.consumer.features.idempotency import no_marks, user_key

        if self.done_marks is None:
            raise no_marks()
        await self.done_marks.mark(user_key(key), True)

    async def progress(self, fraction: float, message: str | None = None) -> None:
        """Report how far the run is (0 to 1) with an optional message: a ``progress`` event
        (best effort: not confirmed, not waited for) and the job's status."""
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise TypeError(f"progress fraction must be a number, got {fraction!r}")
        if not math.isfinite(fraction) or not 0 <= fraction <= 1:
            raise ValueError(f"progress fraction must be from 0 to 1, got {fraction!r}")
        if self.lifecycle is not None:
            await self.lifecycle.progress(
                self.delivery, self.job, self.attempt, float(fraction), message
            )

    async def enqueue(self, job: str, payload: Any, **options: Any) -> str:
        """``await ctx.enqueue(job, payload, **options)``: enqueue a follow-up job, return its
        id. It is published only if this run succeeds, confirmed before this job is acked (a
        crash in between can publish it twice, never lose it); if the run fails, nothing is
        published. ``options`` are ``publish``'s: ``priority``, ``delay``, ``eta``,
        ``job_id``, ``headers``, ``max_attempts``, ``dedup_key`` (needs the status store: a
        key a live job holds returns that job's id and enqueues nothing)."""
        if self.lifecycle is None:
            raise RuntimeError("ctx.enqueue works inside a worker's run only")
        trace = {k: self.headers[k] for k in TRACE_HEADERS if k in self.headers}
        if trace:  # the follow-up continues this job's trace unless told otherwise
            options["headers"] = {**trace, **(options.get("headers") or {})}
        follow_up = await self.lifecycle.follow_up(job, payload, options)
        if follow_up.copy is not None:
            if self.follow_ups is None:
                self.follow_ups = []
            self.follow_ups.append(follow_up)
        return follow_up.job_id

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt >= self.max_attempts
