"""Running a handler: the innermost step of the chain, and how a run's outcome is read.

``invoker`` turns a ``JobSpec`` into the chain's last ``call_next``: an ``async`` handler is
awaited on the loop, a plain ``def`` one runs on a ``JobThreads`` thread (with its own context
copy, so log lines inside it carry the job's fields). Either way it is one path: the timeout is
the ``JobTimeout`` layer's business, except that a thread's clock starts when the thread starts
the job, so for ``def`` handlers the limit is handed to the pool.

``run`` awaits the chain and sorts what came out into ``(result, error)``: a handler's return
value, or the exception that is the run's outcome. A ``CancelledError`` is ours (shutdown, a
lost connection: re-raised so the job goes back unburnt) only while the task is being
cancelled; one the handler raised itself is a failure like any other.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
from collections.abc import Sequence
from typing import Any

from leveret.consumer.context import JobContext
from leveret.consumer.delivery.middleware import (
    CallNext,
    JobMetrics,
    JobTimeout,
    Middleware,
    compose,
    log_context,
)
from leveret.consumer.features.cancellation import Cancellation
from leveret.consumer.features.jobscope import RESOLVED, JobScope
from leveret.consumer.features.ratelimit.layer import RateLimited
from leveret.consumer.features.resources import Plan, Resources
from leveret.consumer.registry import JobSpec
from leveret.consumer.runtime.threads import JobThreads


def _arguments(plan: Plan) -> tuple[tuple[str, ...], bool]:
    """``(names of parameters that take the ctx, needs the job scope)`` for one plan."""
    ctx_only = not plan.steps and not plan.process_needed
    return (plan.parameters if ctx_only else ()), not ctx_only


def _second_positional(fn: Any) -> tuple[str, ...]:
    """The name of ``fn``'s second parameter if it can be passed by position, else ``()``."""
    params = list(inspect.signature(fn).parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(params) == 2 and params[1].kind in positional:
        return (params[1].name,)
    return ()


def invoker(spec: JobSpec, threads: JobThreads, plan: Plan | None = None) -> CallNext:
    """The handler as the chain's innermost ``call_next``.

    Three shapes, picked once: ``fn(payload)``; ``fn(payload, ctx=ctx)`` (only the JobContext
    after the payload: no scope, no lookup); ``fn(payload, **resolved)`` where ``JobScope`` (just
    outside the timeout) put the job's resolved arguments in ``RESOLVED``.
    """
    fn = spec.fn
    plan = plan if plan is not None else Resources().plan(fn, spec.name)
    ctx_names, scoped = _arguments(plan)
    if spec.is_async:
        if scoped:
            resolved = RESOLVED.get

            async def call(ctx: JobContext) -> Any:
                return await fn(ctx.payload, **resolved())
        elif ctx_names and ctx_names == _second_positional(fn):

            async def call(ctx: JobContext) -> Any:
                return await fn(ctx.payload, ctx)
        elif len(ctx_names) == 1:
            (name,) = ctx_names

            async def call(ctx: JobContext) -> Any:
                return await fn(ctx.payload, **{name: ctx})
        elif ctx_names:

            async def call(ctx: JobContext) -> Any:
                return await fn(ctx.payload, **dict.fromkeys(ctx_names, ctx))
        else:

            async def call(ctx: JobContext) -> Any:
                return await fn(ctx.payload)

        return call
    timeout_s = spec.timeout_s

    async def call_in_thread(ctx: JobContext) -> Any:
        kwargs = RESOLVED.get() if scoped else dict.fromkeys(ctx_names, ctx)
        # The timeout counts from when a thread starts the job (see JobThreads).
        run = functools.partial(contextvars.copy_context().run, fn, ctx.payload, **kwargs)
        return await threads.run(run, timeout_s)

    return call_in_thread


def build_chain(
    spec: JobSpec,
    user: Sequence[Middleware],
    metrics: JobMetrics,
    threads: JobThreads,
    *,
    plan: Plan | None = None,
    resources: Resources | None = None,
    rate_limited: RateLimited | None = None,
    tracing: Middleware | None = None,
    cancellation: Cancellation | None = None,
    coordination: Sequence[Middleware] = (),
) -> CallNext:
    """The chain of one job, in the order the ``middleware`` module docstring shows.

    ``plan``/``resources``: how the handler's parameters after the payload resolve (computed by
    ``Worker.check``; without them, only a JobContext can be asked for). The job-scope layer is
    added only when the plan opens something: a handler taking ``(payload)`` or
    ``(payload, ctx)`` pays nothing for resources existing. ``coordination``: the job's
    ``Locked`` and ``Idempotent`` layers (``features.locks.coordination_layers``), if any.
    """
    plan = plan if plan is not None else (resources or Resources()).plan(spec.fn, spec.name)
    layers: list[Middleware] = [log_context]
    if cancellation is not None:
        layers.append(cancellation.layer(spec))
    if rate_limited is not None:
        layers.append(rate_limited)
    layers += coordination
    if tracing is not None:
        layers.append(tracing)
    layers += [metrics, *user]
    if _arguments(plan)[1]:
        layers.append(JobScope(resources or Resources(), plan))
    if spec.timeout_s is not None:
        layers.append(JobTimeout(spec.timeout_s, spec.is_async))
    return compose(layers, invoker(spec, threads, plan))


async def run(chain: CallNext, ctx: JobContext) -> tuple[Any, BaseException | None]:
    """The run's result, or the exception that is its outcome (see the module docstring)."""
    try:
        return await chain(ctx), None
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # we cancelled it (shutdown, lost connection): give the job back
        return None, exc
    except BaseException as exc:
        return None, exc
