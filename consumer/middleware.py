"""The middleware chain every handler run passes through: ``async def mw(ctx, call_next)``.

A middleware is an around-layer in Starlette's style: it gets the job's ``JobContext`` and
``call_next``, the rest of the chain, and calls ``await call_next(ctx)`` to run it. What
``call_next`` returns is the handler's return value (the job's result); what the middleware
returns is what the layer outside it sees, and in the end what settle gets. An exception a
middleware raises or lets through is the run's outcome, exactly as if the handler raised it
(``Reject`` dead-letters, anything else retries until attempts run out).

The chain of one job, outermost first (layers in brackets exist only for jobs that need them)::

    log_context        binds job_id/job/queue/attempt for every log line of the delivery
    [RateLimited]      ``rate_limit=``/``global_rate_limit=``: waits for a start, or gives the
                       job back (``Postponed``) before anything started, so no attempt burns
    [tracing]          an OpenTelemetry span per run, from ``ctx.headers["traceparent"]``
                       (``leveret.consumer.tracing``; only with the SDK configured)
    JobMetrics         leveret_jobs_started_total, leveret_jobs_in_progress
    @worker.middleware user layers, in registration order (the first registered is outermost)
    [JobScope]         opens the job's job-scoped resources, closes them in reverse whatever the
                       outcome (only when the handler's plan opens something)
    [JobTimeout]       the job's ``timeout=`` (only when it has one), innermost, so user
                       layers' and resources' own time is not the handler's
    invoke             the handler itself (``execution.invoker``: async, or a thread for def)

The chain is composed once per job when the worker starts (``build_chain``), never per message:
each layer is the middleware with its ``call_next`` already bound (``functools.partial``), so a
run costs one coroutine per layer and no closures.

Built-in layers are ordered in one place, ``execution.build_chain``. Seams:

* results: the handler's return value already comes back through every layer to the pipeline,
  which hands it to settle (``Settler.succeeded(..., result)``) for a ``succeeded`` event;
* ``ctx.enqueue``/``ctx.progress``: set on ``JobContext`` by the pipeline; the follow-ups
  collected there are published by settle with the outcome copies (see ``settle``).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import structlog
from prometheus_client import Counter, Gauge

from .context import JobContext
from .errors import ConfigError
from .ratelimit import LocalLimiter, Rate
from .resources import Plan, Resources, _close_all, open_job

# The rest of the chain, as a middleware sees it.
CallNext = Callable[[JobContext], Awaitable[Any]]
Middleware = Callable[[JobContext, CallNext], Awaitable[Any]]

_bind_contextvars = structlog.contextvars.bind_contextvars


async def log_context(ctx: JobContext, call_next: CallNext) -> Any:
    """Bind the job's fields to every log line of the delivery, inside the handler too.

    Not unbound on the way out: each delivery runs in a task of its own (so its context dies
    with it), and settle's one log line after the run carries the same fields.
    """
    _bind_contextvars(job_id=ctx.job_id, job=ctx.job, queue=ctx.queue, attempt=ctx.attempt)
    return await call_next(ctx)


class JobMetrics:
    """Counts a run as started and in progress; settle counts its outcome and duration."""

    __slots__ = ("_in_progress", "_started")

    def __init__(self, started: Counter, in_progress: Gauge) -> None:
        self._started = started
        self._in_progress = in_progress

    async def __call__(self, ctx: JobContext, call_next: CallNext) -> Any:
        self._started.inc()
        self._in_progress.inc()
        try:
            return await call_next(ctx)
        finally:
            self._in_progress.dec()


class JobTimeout:
    """Ends a run that overruns its ``timeout=`` with a ``TimeoutError`` that says so.

    An ``async`` handler is cancelled here. A ``def`` handler's clock starts when its thread
    starts it (``JobThreads``), so for those the thread pool applies the limit and this layer
    only names the error the same way.
    """

    __slots__ = ("_limit", "_message", "timeout_s")

    def __init__(self, timeout_s: float, is_async: bool) -> None:
        self.timeout_s = timeout_s
        self._limit = timeout_s if is_async else None
        self._message = f"job overran its timeout of {timeout_s:g} s"

    async def __call__(self, ctx: JobContext, call_next: CallNext) -> Any:
        try:
            async with asyncio.timeout(self._limit):
                return await call_next(ctx)
        except TimeoutError:
            raise TimeoutError(self._message) from None


# The job's resolved handler arguments, from ``JobScope`` to the invoker inside the timeout.
# Each delivery runs in a task of its own, so one job never sees another's (a context copy).
RESOLVED: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("leveret_resolved")


class JobScope:
    """Opens the job's job-scoped resources around the rest of the chain (``Resources``).

    Outside ``JobTimeout``: opening a session is not the handler's time. Whatever the outcome,
    they are closed in reverse order, the run's exception thrown into generator resources (so a
    transaction rolls back), a failing close logged and counted without changing the outcome.

    Without test overrides the layer drives ``resources.open_job`` (the steps ``job_scope``
    takes) directly, with no scope object and no ``__aenter__``/``__aexit__`` frames, at about
    half the scope's cost per job; with overrides it goes through ``job_scope``.
    """

    __slots__ = ("_plan", "_resources")

    def __init__(self, resources: Resources, plan: Plan) -> None:
        self._resources = resources
        self._plan = plan

    async def __call__(self, ctx: JobContext, call_next: CallNext) -> Any:
        r = self._resources
        if r._overrides:
            async with r.job_scope(self._plan, ctx) as kwargs:
                token = RESOLVED.set(kwargs)
                try:
                    return await call_next(ctx)
                finally:
                    RESOLVED.reset(token)
        exits: list[tuple[str, tuple[str, Any]]] = []
        try:
            kwargs = await open_job(r, self._plan, ctx, exits)
        except BaseException as failure:
            await _close_all(
                exits, type(failure), failure, failure.__traceback__, r._close_failures, "job"
            )
            raise
        token = RESOLVED.set(kwargs)
        try:
            result = await call_next(ctx)
        except BaseException as failure:
            RESOLVED.reset(token)
            await _close_all(
                exits, type(failure), failure, failure.__traceback__, r._close_failures, "job"
            )
            raise
        RESOLVED.reset(token)
        await _close_all(exits, None, None, None, r._close_failures, "job")
        return result


class Postponed(Exception):
    """The job may not start before its rate limit allows: give it back for ``delay_s``.

    Raised by ``RateLimited`` before anything ran; the pipeline hands it to settle
    (``Settler.postpone``), which puts a copy with the *same* attempt count into the delay
    chain, confirmed before the ack. Not a failure: no attempt burns, nothing is counted as run.
    """

    def __init__(self, delay_s: float, limit: Rate) -> None:
        super().__init__(f"rate limit {limit} reached; back in {delay_s:.3f} s")
        self.delay_s = delay_s


class _Limiter(Protocol):
    rate: Rate

    async def acquire(self) -> None: ...


class GlobalLimiter(_Limiter, Protocol):
    async def try_acquire(self) -> float: ...


class RateLimited:
    """Admits a run under the job's per-process and global limits, or postpones it.

    A short wait (at most ``max_hold_s``) is waited out holding the delivery, since a round trip
    through the delay chain costs more than it saves; a longer one, or one more waiter than
    ``max_waiting`` (half the prefetch share), gives the job back, so a limited job never holds
    every prefetch slot and other jobs on the queue keep running. Postponed jobs are spread one
    start interval apart (``_spread``) so a backlog comes back at the rate it can start, not all
    at once to be given back again.
    """

    __slots__ = (
        "_blocked_until",
        "_global",
        "_local",
        "_max_hold",
        "_max_waiting",
        "_next",
        "_waiting",
    )

    def __init__(
        self,
        local: LocalLimiter | None,
        global_: GlobalLimiter | None,
        max_waiting: int,
        max_hold_s: float = 1.0,
    ) -> None:
        self._local = local
        self._global = global_
        self._max_waiting = max(1, max_waiting)
        self._max_hold = max_hold_s
        self._waiting = 0
        self._next = 0.0  # monotonic time the next postponed job is asked to come back at
        # Until when the global limiter last said it is full: deliveries arriving before then
        # are postponed without asking it again (a broker-side check is four round trips,
        # serialised per process; asking for every delivery of a backlog would starve the
        # queue's other jobs of the worker's attention).
        self._blocked_until = 0.0

    async def __call__(self, ctx: JobContext, call_next: CallNext) -> Any:
        local = self._local
        if local is not None:
            wait = local.try_acquire()
            if wait:
                await self._wait_or_postpone(local, wait)
        limiter = self._global
        if limiter is not None:
            blocked = self._blocked_until - time.monotonic()
            if blocked > 0 and (blocked > self._max_hold or self._waiting >= self._max_waiting):
                raise Postponed(self._spread(blocked, limiter.rate), limiter.rate)
            wait = await limiter.try_acquire()
            if wait:
                self._blocked_until = time.monotonic() + wait
                await self._wait_or_postpone(limiter, wait)
        return await call_next(ctx)

    async def _wait_or_postpone(self, limiter: _Limiter, wait: float) -> None:
        if wait > self._max_hold or self._waiting >= self._max_waiting:
            raise Postponed(self._spread(wait, limiter.rate), limiter.rate)
        self._waiting += 1
        try:
            await limiter.acquire()
        finally:
            self._waiting -= 1

    def _spread(self, wait: float, rate: Rate) -> float:
        """When to ask a postponed job back: one start interval after the previous one, so a
        backlog returns at the rate it can start. Within a horizon of two windows: beyond it, a
        random moment inside it (a job postponed again must not push every later one out, or a
        backlog circling through the delay chain drifts ever later and the limit is under-used;
        and a fixed horizon would bring the overflow back in one burst)."""
        now = time.monotonic()
        soonest = now + wait
        horizon = soonest + 2 * rate.window
        at = max(self._next, soonest)
        if at > horizon:
            return random.uniform(wait, horizon - now)
        self._next = at + rate.window / rate.limit
        return at - now


def check_middleware(mw: Any) -> Middleware:
    """Refuse at registration what could never be a layer."""
    coroutine = inspect.iscoroutinefunction
    if not callable(mw) or not (coroutine(mw) or coroutine(type(mw).__call__)):
        raise ConfigError(f"middleware {mw!r} must be an `async def mw(ctx, call_next)`")
    try:
        inspect.signature(mw).bind(None, None)
    except TypeError:
        raise ConfigError(f"middleware {mw!r} must take (ctx, call_next)") from None
    return mw  # type: ignore[no-any-return]


def _bind(mw: Middleware, call_next: CallNext) -> CallNext:
    """``mw`` with its ``call_next`` bound: a partial (no extra frame) when it can be a keyword."""
    params = list(inspect.signature(mw).parameters.values())
    second = params[1] if len(params) > 1 else None
    if second is not None and second.kind in (second.POSITIONAL_OR_KEYWORD, second.KEYWORD_ONLY):
        return functools.partial(mw, **{second.name: call_next})

    async def layer(ctx: JobContext) -> Any:
        return await mw(ctx, call_next)

    return layer


def compose(layers: Sequence[Middleware], innermost: CallNext) -> CallNext:
    """One callable running ``layers`` (outermost first) around ``innermost``."""
    chain = innermost
    for mw in reversed(layers):
        chain = _bind(mw, chain)
    return chain
