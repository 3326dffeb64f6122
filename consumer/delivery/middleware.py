"""The middleware chain every handler run passes through: ``async def mw(ctx, call_next)``.

A middleware is an around-layer in Starlette's style: it gets the job's ``JobContext`` and
``call_next``, the rest of the chain, and calls ``await call_next(ctx)`` to run it. What
``call_next`` returns is the handler's return value (the job's result); what the middleware
returns is what the layer outside it sees, and in the end what settle gets. An exception a
middleware raises or lets through is the run's outcome, exactly as if the handler raised it
(``Reject`` dead-letters, anything else retries until attempts run out).

The chain of one job, outermost first (layers in brackets exist only for jobs that need them)::

    log_context        binds job_id/job/queue/attempt for every log line of the delivery
    [Cancellation]     with a status store: a cancelled job is not run, a running
                       ``cancellable=True`` one is cancelled, a cancelled job's failure is not
                       retried (``Cancelled``; ``leveret.consumer.features.cancellation``)
    [RateLimited]      ``rate_limit=``/``global_rate_limit=``: waits for a start, or gives the
                       job back (``Postponed``) before anything started, so no attempt burns
                       (``leveret.consumer.features.ratelimit.layer``)
    [ThenOnce]         with a status store, a group's final job (``x-group-then``): holds
                       ``<group id>.then`` until the delivery is settled; a copy finding it
                       held is ``Postponed``, one finding the job ended is dropped
                       (``AlreadyEnded``); loads ``ctx.group`` (``features.groups``)
    [Locked]           ``lock=``: holds the job's lock key for the run, renewed while it lasts;
                       a key held elsewhere is waited for briefly, else ``Postponed``; a lost
                       lock cancels an async run (``LockLost``; ``features.locks``)
    [Idempotent]       ``idempotency_key=``: a key that already succeeded returns the first
                       run's result without running; a success marks it (``features.idempotency``)
    [tracing]          an OpenTelemetry span per run, from ``ctx.headers["traceparent"]``
                       (``leveret.consumer.features.tracing``; only with the SDK configured)
    JobMetrics         leveret_jobs_started_total, leveret_jobs_in_progress
    @worker.middleware user layers, in registration order (the first registered is outermost)
    [JobScope]         opens the job's job-scoped resources, closes them in reverse whatever the
                       outcome (only when the handler's plan opens something; ``jobscope``)
    [JobTimeout]       the job's ``timeout=`` (only when it has one), innermost, so user
                       layers' and resources' own time is not the handler's
    invoke             the handler itself (``execution.invoker``: async, or a thread for def)

The chain is composed once per job when the worker starts (``build_chain``), never per message:
each layer is the middleware with its ``call_next`` already bound (``functools.partial``), so a
run costs one coroutine per layer and no closures.

Built-in layers are ordered in one place, ``execution.build_chain``. A layer that decides the
run's outcome itself raises a ``DecidedOutcome`` (``Postponed``, ``Cancelled``, ``AlreadyEnded``:
``outcomes``),
which settle carries out; a user's middleware may raise them too. Seams:

* results: the handler's return value already comes back through every layer to the pipeline,
  which hands it to settle (``Settler.succeeded(..., result)``) for a ``succeeded`` event;
* ``ctx.enqueue``/``ctx.progress``: set on ``JobContext`` by the pipeline; the follow-ups
  collected there are published by settle with the outcome copies (see ``settle``).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog
from prometheus_client import Counter, Gauge

from leveret.consumer.context import JobContext
from leveret.consumer.errors import ConfigError

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
    """Counts a run as started and in progress, and records ``started`` (best effort, where a
    status store or ``LEVERET_EVENTS=all`` asks for it); settle counts its outcome."""

    __slots__ = ("_in_progress", "_started")

    def __init__(self, started: Counter, in_progress: Gauge) -> None:
        self._started = started
        self._in_progress = in_progress

    async def __call__(self, ctx: JobContext, call_next: CallNext) -> Any:
        # Here, inside any rate limit: a run its limit postponed never reads ``started``.
        lifecycle = ctx.lifecycle
        if lifecycle is not None and lifecycle.records_started:
            lifecycle.started(ctx.delivery, ctx.job, ctx.attempt)
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
