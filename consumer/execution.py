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
from collections.abc import Sequence
from typing import Any

from .context import JobContext
from .middleware import CallNext, JobMetrics, JobTimeout, Middleware, compose, log_context
from .registry import JobSpec
from .threads import JobThreads


def invoker(spec: JobSpec, threads: JobThreads) -> CallNext:
    """The handler as the chain's innermost ``call_next``."""
    fn = spec.fn
    if spec.is_async:
        if spec.takes_ctx:

            async def call(ctx: JobContext) -> Any:
                return await fn(ctx.payload, ctx)
        else:

            async def call(ctx: JobContext) -> Any:
                return await fn(ctx.payload)

        return call
    timeout_s = spec.timeout_s

    async def call_in_thread(ctx: JobContext) -> Any:
        args = (ctx.payload, ctx) if spec.takes_ctx else (ctx.payload,)
        # The timeout counts from when a thread starts the job (see JobThreads).
        run = functools.partial(contextvars.copy_context().run, fn, *args)
        return await threads.run(run, timeout_s)

    return call_in_thread


def build_chain(
    spec: JobSpec, user: Sequence[Middleware], metrics: JobMetrics, threads: JobThreads
) -> CallNext:
    """The chain of one job, in the order the ``middleware`` module docstring shows."""
    layers: list[Middleware] = [log_context, metrics, *user]
    if spec.timeout_s is not None:
        layers.append(JobTimeout(spec.timeout_s, spec.is_async))
    return compose(layers, invoker(spec, threads))


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
